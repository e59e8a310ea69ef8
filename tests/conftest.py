from __future__ import annotations

import os
import sys
from pathlib import Path

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
