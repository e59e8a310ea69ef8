"""The memory budget holds under a 100,000-event backlog (real broker, Redis, Qdrant engine, model).

This test measures the RSS of the test process itself, so it lives in a file that sorts
first: run after the rest of the suite, the heap those tests leave behind (arenas of
threads long gone, fragments of other workers' batches) moved its reading by tens of MiB
from run to run, which no setting of the worker controls.
"""

from __future__ import annotations

import asyncio

import pytest

from streams.flow import Watermarks
from streams.allocator import release_free_memory
from support import committed_offsets, event, make_settings, make_sink, produce, running_worker, until

pytestmark = pytest.mark.integration

POOL = [f"Support ticket {i}: the export to CSV times out after {i % 7 + 1} minutes on the dashboard." for i in range(200)]


_PRODUCER_SCRIPT = """
import asyncio, sys, orjson
from aiokafka import AIOKafkaProducer
bootstrap, topic, total, documents = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
pool = [f"Support ticket {i}: the export to CSV times out after {i % 7 + 1} minutes on the dashboard." for i in range(200)]
async def main():
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=20)
    await producer.start()
    for i in range(total):
        body = {"id": f"doc-{i % documents}", "text": pool[i % len(pool)] + f" v{i // documents}",
                "metadata": {"note": "x" * 600}}
        await producer.send(topic, orjson.dumps(body))
    await producer.stop()
asyncio.run(main())
"""


async def test_backlog_under_a_memory_budget_pauses_resumes_and_finishes(services, embedder):
    """100,000 small events, a memory budget just above the warmed-up worker: RSS stays under it.

    The events update 5,000 documents (ids repeat), all written once during the warm-up,
    so the embedded Qdrant engine, which lives in this process, does not grow with the
    backlog: the budget measures the worker's own buffering, as it would beside a Qdrant
    server. The backlog is produced by another process for the same reason.
    """
    import subprocess
    import sys

    import psutil

    total, documents = 100_000, 5000
    settings = await make_settings(
        services, partitions=4, buffer_max_messages=50_000, buffer_max_bytes=10**9,
        fetch_max_records=2000, batch_max_messages=512, batch_max_tokens=65536, max_in_flight_batches=4,
    )
    process = psutil.Process()
    sink = make_sink(settings)
    # Warm-up: every document once, so the in-process store is at its final size, and the
    # model, clients and allocator have seen full-size batches.
    async with running_worker(settings, embedder, sink=sink) as worker:
        await produce(settings, [event(f"doc-{i}", POOL[i % len(POOL)]) for i in range(documents)])
        await until(lambda: worker.stats.processed == documents, timeout=120, what="warm-up")
    # The whole backlog waits in the topic before the measured worker starts, so intake
    # outruns processing and the memory limit must hold it back.
    await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", _PRODUCER_SCRIPT, settings.bootstrap_servers, settings.input_topic, str(total), str(documents)],
        check=True, timeout=300,
    )
    release_free_memory()  # earlier tests' freed pages would otherwise hide the growth
    baseline = process.memory_info().rss
    mib = 1024 * 1024
    budget = baseline + 128 * mib
    settings = settings.replace(memory_budget_bytes=budget)
    async with running_worker(settings, embedder, sink=sink) as worker:
        # Memory must be the binding signal: the other intake limits are lifted, so without
        # the memory pause the worker would buffer the whole backlog (~100 MB of payloads).
        # The marks sit relative to this process's baseline, not to an absolute budget.
        for signal in ("in_flight_batches", "buffered_messages", "buffered_bytes"):
            worker.flow._marks[signal] = Watermarks(high=10**12, low=10**12)
        worker.flow._marks["memory"] = Watermarks(high=baseline + 40 * mib, low=baseline + 24 * mib)
        await until(lambda: worker.stats.processed == total, timeout=600, what="the backlog to drain")
        await until(lambda: sum(worker.lag_records().values()) == 0, timeout=30, what="final commits")
        stats = worker.stats
    assert stats.pause_reasons.get("memory", 0) >= 1 and stats.resumes >= 1
    assert stats.max_rss_bytes < budget, (stats.max_rss_bytes - baseline) / 2**20
    assert await sink.count() == documents
    assert sum((await committed_offsets(settings, 4)).values()) == total + documents
    print(f"\nbacklog: pauses={stats.pauses} {stats.pause_reasons} resumes={stats.resumes} "
          f"rss_ceiling={(stats.max_rss_bytes - baseline) / 2**20:.0f} MiB over the warm worker "
          f"(budget {(budget - baseline) / 2**20:.0f}), batch sizes max={max(stats.batch_sizes)}")
