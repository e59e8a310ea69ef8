"""In-process CLI runs for the tests: a clean settings environment and (exit code, stdout, stderr)."""

from __future__ import annotations

import logging
import os

import pytest

from streams import cli


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


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """`embedworker ARGV` in this process: (exit code, stdout, stderr)."""
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as exc:  # argparse: --help and usage errors
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err
