"""The migration transcript of docs/operations.md: `python -m bench.migration_transcript` (~1 min).

Starts the local broker, uses the Redis at 127.0.0.1:6379 (db 5) and a qdrant-edge path under
/tmp, produces the recall benchmark's corpus, runs the worker until it has caught up, and then
runs the `embedworker migrate` steps (the bundled model cut to 128 dimensions as the new one),
printing each command and its output.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EMBEDWORKER = str(Path(sys.executable).with_name("embedworker"))


def main() -> None:
    from streams.backends.kafka import ensure_topics
    from streams.config import load_settings
    from streams.devstack import LocalBroker

    path = tempfile.mkdtemp(prefix="embedworker-migrate-")
    log = Path(path) / "worker.log"
    with LocalBroker() as broker:
        env = {k: v for k, v in os.environ.items() if not k.startswith("EMBEDWORKER_")}
        env.update(EMBEDWORKER_BOOTSTRAP_SERVERS=broker.bootstrap_servers, EMBEDWORKER_QDRANT_PATH=str(Path(path) / "q"),
                   EMBEDWORKER_QDRANT_ENGINE="edge", EMBEDWORKER_VERSIONED_COLLECTIONS="true",
                   EMBEDWORKER_REDIS_URL="redis://127.0.0.1:6379/5", EMBEDWORKER_METRICS_PORT="0", HF_HUB_OFFLINE="1",
                   EMBEDWORKER_DEVICE="cpu")
        settings = load_settings({"bootstrap_servers": broker.bootstrap_servers}, environ={})
        asyncio.run(ensure_topics(settings, {"texts": 4, "embeddings": 4, "texts.dlq": 1}))

        def run(*args: str) -> None:
            print("$ embedworker " + " ".join(args), flush=True)
            done = subprocess.run([EMBEDWORKER, *args], env=env, capture_output=True, text=True)
            print(done.stdout, end="")
            if done.returncode:
                print(done.stderr[-800:], end="", file=sys.stderr)

        def worker() -> subprocess.Popen:
            return subprocess.Popen([EMBEDWORKER, "run"], env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT)

        def until(condition, seconds: float) -> None:
            deadline = time.monotonic() + seconds
            while not condition() and time.monotonic() < deadline:
                time.sleep(0.5)  # polling another process's progress

        def caught_up() -> bool:
            lines = subprocess.run([EMBEDWORKER, "status"], env=env, capture_output=True, text=True).stdout.strip().splitlines()
            return bool(lines) and lines[-1].startswith("    total") and lines[-1].split()[-1] == "0"

        run("produce", str(ROOT / "bench/data/recall_corpus.jsonl"), "--format", "jsonl")
        process = worker()
        until(caught_up, 300)
        process.send_signal(signal.SIGTERM)
        process.wait()
        run("migrate", "start", "--model", "all-MiniLM-L6-v2", "--dimensions", "128")
        run("migrate", "backfill")
        process = worker()
        until(lambda: "dual writes:" in log.read_text(errors="replace"), 120)
        process.send_signal(signal.SIGTERM)
        process.wait()
        run("migrate", "check", "--queries", str(ROOT / "bench/data/recall_queries.jsonl"))
        run("migrate", "cutover")
        run("search", "how do I get my money back", "--limit", "3")
        run("migrate", "rollback")
        run("migrate", "cutover")
        run("migrate", "finish", "--drop-old")
    shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    main()
