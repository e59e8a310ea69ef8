"""`embedworker demo`: the whole product on one machine, started and stopped by itself."""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import sys
import time
from typing import Any

from streams.config import Settings
from streams.corpus import demo_events

QUERIES = ("my order was billed two times", "heavy snowfall expected", "how to cook rice slowly")


def _percentile(values: list[float], share: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


async def _wait(condition, *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"demo: timed out waiting for {what}")
        await asyncio.sleep(0.05)  # polling a condition with a deadline


async def run_demo(settings: Settings, *, count: int = 1200) -> int:
    from tqdm import tqdm

    from streams.assembly import assemble
    from streams.devstack import LocalBroker, LocalRedis
    from streams.backends.kafka import ensure_topics, make_producer

    out = sys.stdout
    async with contextlib.AsyncExitStack() as stack_async:
        stack = contextlib.ExitStack()
        stack_async.enter_context(stack)
        changes: dict[str, Any] = {"metrics_port": 0}
        if settings.bootstrap_servers == "localhost:9092" and "EMBEDWORKER_BOOTSTRAP_SERVERS" not in __import__("os").environ:
            broker = stack.enter_context(LocalBroker())
            changes["bootstrap_servers"] = broker.bootstrap_servers
            print(f"started local Kafka-compatible broker (Tansu) on {broker.bootstrap_servers}", file=out)
        if not settings.redis_url:
            redis = stack.enter_context(LocalRedis())
            changes["redis_url"] = redis.url
            print(f"started redis-server on port {redis.port}", file=out)
        settings = settings.replace(**changes)
        print(f"Qdrant: {settings.qdrant_url or settings.qdrant_path or 'embedded engine, in memory'}", file=out)

        await ensure_topics(settings, {settings.input_topic: 4, settings.output_topic: 4, settings.dlq_topic: 1})
        print("loading model ...", file=out)
        loop = asyncio.get_running_loop()
        parts = await stack_async.enter_async_context(assemble(settings))
        embedder, sink = parts.embedder, parts.sink
        print(f"model {embedder.name} on {embedder.device} (dim {embedder.dim})", file=out)
        worker = parts.worker()
        task = asyncio.create_task(worker.run())
        await _wait(lambda: task.done() or bool(worker.lag_records()) or worker.started.is_set(), timeout=60, what="the worker to start")

        events = list(demo_events(count))
        producer = make_producer(settings)
        await producer.start()
        started = time.monotonic()
        try:
            for key, value in events:
                await producer.send(settings.input_topic, value=value, key=key)
            await producer.flush()
        finally:
            await producer.stop()

        total = len(events)
        with tqdm(total=total, desc="embedding", unit="msg", file=out, mininterval=0.5) as bar:
            def finished() -> int:
                return worker.stats.processed + worker.stats.dead_letters

            def drained() -> bool:
                bar.update(finished() - bar.n)
                return task.done() or finished() >= total

            await _wait(drained, timeout=600, what="the backlog to drain")
        elapsed = time.monotonic() - started
        await _wait(lambda: task.done() or sum(worker.lag_records().values()) == 0, timeout=30, what="offsets to be committed")
        if task.done():
            task.result()

        stats = worker.stats
        latencies = list(stats.latencies)
        print("", file=out)
        print("summary", file=out)
        print(f"  events produced     {total}", file=out)
        print(f"  processed           {stats.processed}", file=out)
        print(f"  cache hits          {stats.cached}", file=out)
        print(f"  truncated texts     {stats.truncated}", file=out)
        print(f"  dead letters        {stats.dead_letters}", file=out)
        print(f"  points in Qdrant    {await sink.count()}", file=out)
        print(f"  throughput          {stats.processed / elapsed:.1f} msg/s (CPU, {elapsed:.1f} s)", file=out)
        print(f"  latency p50 / p99   {_percentile(latencies, 0.5) * 1000:.0f} ms / {_percentile(latencies, 0.99) * 1000:.0f} ms", file=out)
        if stats.batch_sizes:
            print(f"  batch size median   {statistics.median(stats.batch_sizes):.0f}", file=out)

        for query in QUERIES:
            vector = (await loop.run_in_executor(None, embedder.embed, [query])).vectors[0]
            print(f"\nsearch: {query!r}", file=out)
            # The sample corpus repeats its sentences: show distinct texts, best chunk of each.
            shown: set[str] = set()
            for hit in await sink.search(vector, limit=40):
                text = " ".join(str(hit.payload.get("text", "")).split())
                if text in shown:
                    continue
                shown.add(text)
                count = hit.payload.get("chunk_count", 1)
                where = f" [chunk {hit.payload.get('chunk_index', 0) + 1}/{count}]" if isinstance(count, int) and count > 1 else ""
                print(f"  {hit.score:.3f}  {hit.payload.get('id')}{where}  {text[:90]}", file=out)
                if len(shown) == 3:
                    break

        worker.request_stop()
        await task
        print("\nstopped every process the demo started", file=out)
    return 0
