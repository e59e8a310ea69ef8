"""`embedworker run --processes N`: N worker processes on one host, each a consumer-group member.

One worker process is bound by its GIL: decoding, hashing, point construction, result
encoding and offset bookkeeping share one core while the accelerator waits. N processes
split the partitions between them through the consumer group (Kafka does the balancing;
nothing here coordinates them) and share the GPU, the Redis cache and a Qdrant server.

Refused with the embedded store (`EMBEDWORKER_QDRANT_PATH`) and the in-memory one: both
belong to a single process. The supervisor forwards SIGTERM/SIGINT (each child drains and
commits), gives child i the metrics port `EMBEDWORKER_METRICS_PORT + i`, splits the CPU
threads of torch between the children unless `EMBEDWORKER_TORCH_THREADS` is set, and when
one child fails it stops the others and exits with that child's status, so the process
manager above (systemd, Kubernetes) restarts the whole unit.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import fields
from typing import Mapping

from streams.config import ENV_PREFIX, ConfigError, Settings

log = logging.getLogger(__name__)


def check_processes(settings: Settings) -> None:
    """A clear error when several processes cannot share this configuration's store."""
    if settings.processes <= 1:
        return
    if not settings.qdrant_url:
        where = f"the embedded store at {settings.qdrant_path}" if settings.qdrant_path else "the in-memory store"
        raise ConfigError(
            "EMBEDWORKER_PROCESSES",
            f"{settings.processes} processes cannot share {where}: it belongs to one process; "
            "give a Qdrant server (EMBEDWORKER_QDRANT_URL) or run one process",
        )


def child_environment(settings: Settings, index: int, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Child `index`'s environment: every resolved setting as its variable, its own metrics port, its share of threads."""
    env = dict(os.environ if environ is None else environ)
    for f in fields(settings):
        value = getattr(settings, f.name)
        env[ENV_PREFIX + f.name.upper()] = str(value)
    env[ENV_PREFIX + "PROCESSES"] = "1"
    if settings.metrics_port:
        env[ENV_PREFIX + "METRICS_PORT"] = str(settings.metrics_port + index)
    if not settings.torch_threads:
        env[ENV_PREFIX + "TORCH_THREADS"] = str(max(1, (os.cpu_count() or 1) // settings.processes))
    return env


def supervise(settings: Settings, *, command: list[str] | None = None, poll_seconds: float = 0.2) -> int:
    """Run the children until all exit; a failing child stops the rest. Returns the exit status."""
    check_processes(settings)
    command = command or [sys.executable, "-m", "streams.cli", "run"]
    children = [
        # A session of their own: a terminal's Ctrl-C reaches the supervisor only, which forwards one SIGTERM
        # (a child that got both would take the second as "exit at once").
        subprocess.Popen(command, env=child_environment(settings, i), start_new_session=True)
        for i in range(settings.processes)
    ]
    log.info("started %d worker processes (pids %s)", len(children), ", ".join(str(c.pid) for c in children))
    stopping = {"signals": 0}

    def forward(signum: int, _frame: object) -> None:
        stopping["signals"] += 1
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM if stopping["signals"] == 1 else signal.SIGKILL)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    status = 0
    try:
        while any(child.poll() is None for child in children):
            failed = next((c for c in children if c.returncode not in (None, 0)), None)
            if failed is not None and not stopping["signals"]:
                log.error("worker process %d exited with %d: stopping the others", failed.pid, failed.returncode)
                status = failed.returncode if failed.returncode > 0 else 128 - failed.returncode  # killed by a signal
                forward(signal.SIGTERM, None)
            time.sleep(poll_seconds)  # a supervisor's wait on child processes: nothing to await
        if not status:
            code = next((c.returncode for c in children if c.returncode), 0)
            status = code if code >= 0 else 128 - code
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return status
