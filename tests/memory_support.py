"""The in-memory broker's worker helpers shared by the runtime tests (settings, a condition wait, a running worker)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any, AsyncIterator

from fakes import WordEmbedder
from processors.sink import QdrantSink
from streams.backends.memory import MemoryBroker
from streams.config import load_settings
from streams.assembly import build_worker
from streams.runtime import PublishError, Worker
from support import unique


def memory_settings(broker: MemoryBroker, partitions: int = 1, **overrides: Any):
    name = unique("m")
    values: dict[str, Any] = {
        "input_topic": f"{name}.in", "output_topic": f"{name}.out", "dlq_topic": f"{name}.dlq",
        "group_id": f"{name}.g", "collection": name, "metrics_port": 0, "commit_interval_ms": 20,
        "shutdown_timeout_seconds": 2.0, "batch_min_messages": 4, "batch_max_messages": 8,
        "batch_min_wait_ms": 1.0, "batch_max_wait_ms": 5.0,
    }
    values.update(overrides)
    settings = load_settings(values, environ={})
    broker.create_topic(settings.input_topic, partitions)
    broker.create_topic(settings.output_topic, partitions)
    broker.create_topic(settings.dlq_topic, 1)
    return settings


async def until(condition, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.002)


@contextlib.asynccontextmanager
async def worker_on(broker: MemoryBroker, settings: Any, **kwargs: Any) -> AsyncIterator[Worker]:
    kwargs.setdefault("sink", QdrantSink(collection=settings.collection))
    worker = build_worker(settings, embedder=kwargs.pop("embedder", WordEmbedder(max_tokens=64)), backend=broker, **kwargs)
    task = asyncio.create_task(worker.run())
    try:
        await until(lambda: worker.started.is_set() or task.done(), "worker start")
        if task.done():
            task.result()
        yield worker
    finally:
        worker.request_stop()
        with contextlib.suppress(PublishError):
            await asyncio.wait_for(task, timeout=10)
