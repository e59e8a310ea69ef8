from __future__ import annotations

import os
import sys
from pathlib import Path

import logging

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from support import Services, start_services  # noqa: E402


@pytest.fixture(scope="session")
def services() -> Services:
    started = start_services()
    yield started
    started.close()


@pytest.fixture(scope="session")
def embedder():
    from processors.embedder import SentenceTransformerEmbedder

    return SentenceTransformerEmbedder(device="cpu")


@pytest.fixture
def clean_cli_state(monkeypatch):
    """No EMBEDWORKER_* variables from the outside; logging restored after each in-process run."""
    for name in list(os.environ):
        if name.startswith("EMBEDWORKER_"):
            monkeypatch.delenv(name)
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, {n: logging.getLogger(n).level for n in ("aiokafka", "embedworker")})
    yield
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    for name, level in saved[2].items():
        logging.getLogger(name).setLevel(level)
