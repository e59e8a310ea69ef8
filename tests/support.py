"""Shared test helpers: real services (containers, external, or local), topics, readers.

Service choice, once per session:
1. `KAFKA_BOOTSTRAP_SERVERS`, `REDIS_URL`, `QDRANT_URL` in the environment win.
2. Else, when a Docker engine answers a ping, testcontainers' Kafka, Redis and Qdrant.
3. Else the local Tansu broker, a local redis-server, and Qdrant's embedded engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable, Sequence

import numpy as np
import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from processors.cache import RedisCache
from doubles import WordEmbedder
from processors.sink import Point, QdrantSink
from streams import cli
from streams.backends.memory import MemoryBroker
from streams.assembly import build_sink
from streams.config import Settings, load_settings
from streams.backends.kafka import ensure_topics, make_producer
from streams.metrics import Metrics
from streams.assembly import build_worker
from streams.runtime import PublishError, Worker


def docker_available() -> bool:
    """A ping, not `which docker`: the CLI may exist without an engine."""
    try:
        import docker
        from docker.errors import DockerException

        try:
            docker.from_env(timeout=2).ping()
            return True
        except DockerException:
            return False
    except Exception:
        return False


@dataclass
class Services:
    bootstrap_servers: str
    redis_url: str
    qdrant_url: str | None
    kind: str
    _stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    broker: Any = None
    redis: Any = None

    def close(self) -> None:
        self._stack.close()


def start_services() -> Services:
    stack = contextlib.ExitStack()
    kafka = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    redis_url = os.environ.get("REDIS_URL")
    qdrant_url = os.environ.get("QDRANT_URL")
    broker = redis = None
    kind = "external"
    if not (kafka and redis_url and qdrant_url) and docker_available():
        kind = "containers"
        if not kafka:
            from testcontainers.kafka import KafkaContainer

            container = stack.enter_context(KafkaContainer())
            kafka = container.get_bootstrap_server()
        if not redis_url:
            from testcontainers.redis import RedisContainer

            container = stack.enter_context(RedisContainer())
            redis_url = f"redis://{container.get_container_host_ip()}:{container.get_exposed_port(6379)}/0"
        if not qdrant_url:
            from testcontainers.qdrant import QdrantContainer

            container = stack.enter_context(QdrantContainer())
            qdrant_url = f"http://{container.rest_host_address}"
    else:
        from streams.devstack import LocalBroker, LocalRedis

        if not kafka:
            kind = "local"
            broker = stack.enter_context(LocalBroker())
            kafka = broker.bootstrap_servers
        if not redis_url:
            redis = stack.enter_context(LocalRedis())
            redis_url = redis.url
    return Services(kafka, redis_url, qdrant_url, kind, stack, broker, redis)


TEXTS = [
    "The espresso machine works exactly as described.",
    "Hello, I was charged twice for the same order.",
    "The city council approved a new budget for road repairs.",
    "Whisk the eggs with a pinch of salt before folding in the flour.",
    "Rate limits apply per API key and reset at the start of every minute.",
]
"""Five texts of unrelated topics (no two embed alike)."""


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def make_settings(services: Services, partitions: int = 2, **overrides: Any) -> Settings:
    """Settings with topics, group and collection of their own, topics created."""
    name = unique("t")
    values: dict[str, Any] = {
        "bootstrap_servers": services.bootstrap_servers,
        "input_topic": f"{name}.in",
        "output_topic": f"{name}.out",
        "dlq_topic": f"{name}.dlq",
        "group_id": f"{name}.group",
        "collection": name,
        "redis_url": services.redis_url,
        "qdrant_url": services.qdrant_url or "",
        "metrics_port": 0,
        "commit_interval_ms": 100,
        "shutdown_timeout_seconds": 20,
    }
    values.update(overrides)
    settings = load_settings(values, environ={})
    await ensure_topics(settings, {settings.input_topic: partitions, settings.output_topic: partitions, settings.dlq_topic: 1})
    return settings


def make_sink(settings: Settings) -> QdrantSink:
    return build_sink(settings)


def make_cache(settings: Settings, metrics: Metrics | None = None) -> RedisCache:
    prefix = f"test:{settings.collection}:"
    hook = None
    if metrics is not None:
        hook = lambda op: metrics.cache_errors.labels(operation=op).inc()  # noqa: E731
    return RedisCache(url=settings.redis_url, prefix=prefix, on_error=hook, timeout_seconds=0.5)


async def until(
    condition: Callable[[], bool | Awaitable[bool]], what: str = "a condition", *, timeout: float = 10.0,
    interval: float | None = None,
) -> None:
    """Wait until `condition` (sync or async) is true, or fail naming `what` after `timeout` seconds.

    The one wait of the tests: never a bare sleep. `interval` defaults to 2 ms for a plain
    condition (in-process state) and 50 ms for an awaitable one (a broker or store round trip).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        awaited = asyncio.iscoroutine(value) or isinstance(value, Awaitable)
        if awaited:
            value = await value  # type: ignore[misc]
        if value:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval if interval is not None else (0.05 if awaited else 0.002))


async def produce(
    settings: Settings,
    values: list[bytes | None],
    keys: list[bytes | None] | None = None,
    topic: str | None = None,
    headers: list[list[tuple[str, bytes]]] | None = None,
) -> None:
    producer = make_producer(settings, linger_ms=20)
    await producer.start()
    try:
        for index, value in enumerate(values):
            key = keys[index] if keys else None
            await producer.send(topic or settings.input_topic, value=value, key=key, headers=headers[index] if headers else None)
        await producer.flush()
    finally:
        await producer.stop()


def event(event_id: str, text: str, **metadata: Any) -> bytes:
    body: dict[str, Any] = {"id": event_id, "text": text}
    if metadata:
        body["metadata"] = metadata
    return orjson.dumps(body)


async def read_topic(settings: Settings, topic: str, *, expect: int | None = None, timeout: float = 60.0) -> list[Any]:
    """Every record of `topic` (group-less reader), waiting until `expect` are there."""
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap_servers, enable_auto_commit=False, auto_offset_reset="earliest")
    await consumer.start()
    try:
        partitions = None
        deadline = time.monotonic() + timeout
        while not partitions:
            partitions = consumer.partitions_for_topic(topic)
            if not partitions:
                await consumer._client.force_metadata_update()
                if time.monotonic() > deadline:
                    raise AssertionError(f"topic {topic} not found")
                await asyncio.sleep(0.1)
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        records: list[Any] = []
        idle_since = time.monotonic()
        while True:
            batch = await consumer.getmany(timeout_ms=200)
            got = [r for rs in batch.values() for r in rs]
            records.extend(got)
            if got:
                idle_since = time.monotonic()
            if expect is not None and len(records) >= expect and time.monotonic() - idle_since > 0.3:
                return records
            if expect is None and time.monotonic() - idle_since > 1.0:
                return records
            if time.monotonic() > deadline:
                if expect is None:
                    return records
                raise AssertionError(f"{topic}: {len(records)} records after {timeout}s, expected {expect}")
    finally:
        await consumer.stop()


async def committed_offsets(settings: Settings, partitions: int) -> dict[int, int]:
    """The group's committed offset per input partition (a consumer's `committed`, see FINDINGS)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap_servers, group_id=settings.group_id, enable_auto_commit=False)
    await consumer.start()
    try:
        result = {}
        for p in range(partitions):
            result[p] = await consumer.committed(TopicPartition(settings.input_topic, p)) or 0
        return result
    finally:
        await consumer.stop()


@contextlib.asynccontextmanager
async def running_worker(
    settings: Settings, embedder: Any, *, sink: Any = None, cache: Any = None, metrics: Metrics | None = None, observer: Any = None
) -> AsyncIterator[Worker]:
    from streams.assembly import assemble

    metrics = metrics or Metrics()
    sink = sink or make_sink(settings)
    cache = cache if cache is not None else make_cache(settings, metrics)
    async with assemble(settings, embedder=embedder, sink=sink, cache=cache, metrics=metrics) as parts:
        worker = parts.worker(observer=observer)
        task = asyncio.create_task(worker.run())
        try:
            await until(lambda: task.done() or worker.started.is_set(), timeout=30, what="worker start")
            if task.done():
                task.result()
            yield worker
        finally:
            worker.request_stop()
            await asyncio.wait_for(task, timeout=60)


class LatencyProxy:
    """A TCP proxy that delays every chunk it forwards by a random time: a remote Redis, here.

    Runs on the test's event loop; the worker (in process or not) connects to `url`.
    """

    def __init__(self, target_host: str, target_port: int, *, max_delay_seconds: float = 0.005, seed: int = 0) -> None:
        import random

        self.target = (target_host, target_port)
        self.max_delay_seconds = max_delay_seconds
        self._random = random.Random(seed)
        self._server: Any = None
        self.port = 0

    async def __aenter__(self) -> "LatencyProxy":
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self._server.close()
        await self._server.wait_closed()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            try:
                while data := await source.read(65536):
                    await asyncio.sleep(self._random.uniform(0, self.max_delay_seconds))  # injected latency
                    sink.write(data)
                    await sink.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                sink.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer), return_exceptions=True)


# ---- the in-memory broker (runtime tests) -----------------------------------------------


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


@contextlib.asynccontextmanager
async def worker_on(broker: MemoryBroker, settings: Any, **kwargs: Any) -> AsyncIterator[Worker]:
    kwargs.setdefault("sink", QdrantSink(collection=settings.collection))
    worker = build_worker(settings, embedder=kwargs.pop("embedder", WordEmbedder(max_tokens=64)), backend=broker, **kwargs)
    task = asyncio.create_task(worker.run())
    try:
        await until(lambda: worker.started.is_set() or task.done(), what="worker start")
        if task.done():
            task.result()
        yield worker
    finally:
        worker.request_stop()
        with contextlib.suppress(PublishError):
            await asyncio.wait_for(task, timeout=10)


# ---- the CLI in this process --------------------------------------------------------------


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """`embedworker ARGV` in this process: (exit code, stdout, stderr)."""
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as exc:  # argparse: --help and usage errors
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---- stores of each engine, and reading one back -----------------------------------------

STORE_KINDS = ["qdrant-memory", "qdrant-path", "edge"]
"""The embedded engines every store test runs on: qdrant-client in memory and on a path, qdrant-edge."""


def make_store(kind: str, path: Any, collection: str = "c") -> Any:
    """A store of engine `kind` (see `STORE_KINDS`); `path` is a directory for the path engines."""
    from processors.edge_sink import EdgeSink

    if kind == "qdrant-memory":
        return QdrantSink(collection=collection)
    if kind == "qdrant-path":
        return QdrantSink(collection=collection, path=str(path))
    return EdgeSink(collection=collection, path=str(path))


# ---- reading a store back (the shipped store protocols have no per-id reads) ---------------


async def retrieve(store: Any, ids: Sequence[str]) -> dict[str, tuple[np.ndarray, dict[str, Any]]]:
    """Vector and payload of each of `ids` that is stored (absent ids are left out)."""
    wanted = set(ids)
    return {p.id: (p.vector, p.payload) for p in await store.points(with_vectors=True) if p.id in wanted}


async def point_ids(store: Any) -> list[str]:
    """Every stored point id."""
    return [p.id for p in await store.points(with_vectors=False)]


async def put_points(store: Any, points: Sequence[Point]) -> None:
    """Write bare points (no chunk replacement, no version guard): seeding a store as an older release left it."""
    if points:
        await store._call(store.upsert_points, list(points), ())
