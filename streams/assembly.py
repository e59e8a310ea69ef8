"""The composition root: the one place that builds a worker's parts from `Settings`.

Owns: which embedder, store, cache, pipeline and worker a run gets, and the lifetime of
what it built (`assemble`). `build_pipeline` is the only `Pipeline(...)` call and
`build_worker` the only `Worker(...)` call in the shipped code; the CLI (run, demo, search,
reembed, dlq), the Faust app, the bench and the tests all come through here, so an option
added to `Settings` is wired once. Must not: run anything; parts handed in are used as they
are and left open for their owner.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, AsyncIterator

from processors.cache import RedisCache, VectorCache
from processors.edge_sink import EdgeSink, holds_edge_shards
from processors.embedder import Embedder, SentenceTransformerEmbedder
from processors.errors import SinkConfigError
from processors.pipeline import Pipeline, PipelineHooks
from processors.sink import QdrantSink, StoreWriter, VectorStore, parse_payload_indexes
from schemas.mapping import Mapping, parse_mapping
from streams.config import Settings
from streams.metrics import Metrics

if TYPE_CHECKING:
    from schemas.tenancy import TenantSource
    from streams.quotas import TenantQuotas
    from streams.backends import Backend
    from streams.runtime import Worker, WorkerObserver

log = logging.getLogger(__name__)

NO_CACHE: Any = object()
"""Pass as `cache` for a run without the Redis cache even when `redis_url` is set."""


def build_mapping(settings: Settings) -> Mapping:
    """How records are read (`EMBEDWORKER_INPUT_FORMAT` and the `*_FROM` settings): the worker, Faust and reembed."""
    return parse_mapping(
        input_format=settings.input_format, id_from=settings.id_from, text_from=settings.text_from,
        metadata_from=settings.metadata_from, version_from=settings.version_from,
    )


def build_tenant_source(settings: Settings) -> "TenantSource | None":
    """Where an event's tenant is read (`EMBEDWORKER_TENANT_FROM`); None: one tenant."""
    from schemas.tenancy import parse_tenant_from

    return parse_tenant_from(settings.tenant_from) if settings.tenant_from else None


def build_quotas(settings: Settings) -> "TenantQuotas":
    """Per-tenant token quotas (`EMBEDWORKER_TENANT_TOKENS_PER_SECOND`, `_TENANT_QUOTAS_FILE`); inactive without tenants."""
    from streams.quotas import TenantQuotas, load_quotas

    if not settings.tenant_from:
        return TenantQuotas(0)
    overrides = load_quotas(settings.tenant_quotas_file) if settings.tenant_quotas_file else {}
    return TenantQuotas(settings.tenant_tokens_per_second, overrides)


def build_embedder(settings: Settings, *, model: str | None = None) -> Embedder:
    """The local model, or a client of an embedding server (`EMBEDWORKER_EMBEDDER=http`).

    `model`: another model than `settings.model` on the same kind of embedder (reembed's
    `--model`): a served model when the embedder is `http`.
    """
    model = model or settings.model
    if settings.embedder == "http":
        from processors.http_embedder import HttpEmbedder

        return HttpEmbedder(
            url=settings.embeddings_url,
            model=model,
            api_key=settings.embeddings_api_key or None,
            dimensions=settings.dimensions or settings.embeddings_dimensions or None,
            max_batch=settings.embeddings_max_batch,
            max_concurrency=settings.embeddings_concurrency,
            encoding=settings.embeddings_encoding,
            retry_seconds=settings.embeddings_retry_seconds,
        )
    return SentenceTransformerEmbedder(
        model=model, device=settings.device, threads=settings.torch_threads or None, dimensions=settings.dimensions or None
    )


def build_sink(settings: Settings, collection: str | None = None) -> QdrantSink | EdgeSink:
    """A server (URL), an embedded path store (EMBEDWORKER_QDRANT_ENGINE picks edge or local), or in memory."""
    collection = collection or settings.collection
    indexes = parse_payload_indexes(settings.payload_indexes)
    if settings.tenant_from:
        indexes.setdefault("tenant", "keyword")  # the tenant key (`is_tenant` on a server): every tenant filter uses it
    if settings.qdrant_path and not settings.qdrant_url and settings.qdrant_engine == "edge":
        return EdgeSink(collection=collection, path=settings.qdrant_path, payload_indexes=indexes, sparse=settings.sparse,
                        quantization=settings.quantization, versioned_collections=settings.versioned_collections)
    if settings.qdrant_path and not settings.qdrant_url and holds_edge_shards(settings.qdrant_path, collection):
        raise SinkConfigError(f"{settings.qdrant_path} holds qdrant-edge shards: open it with EMBEDWORKER_QDRANT_ENGINE=edge")
    return QdrantSink(
        collection=collection,
        payload_indexes=indexes,
        url=settings.qdrant_url or None,
        api_key=settings.qdrant_api_key or None,
        path=settings.qdrant_path or None,
        sparse=settings.sparse,
        quantization=settings.quantization,
        versioned_collections=settings.versioned_collections,
    )


def build_cache(settings: Settings, metrics: Metrics | None = None) -> VectorCache | None:
    """The Redis cache when `redis_url` is set (its errors and refused values counted in `metrics`)."""
    if not settings.redis_url:
        return None
    on_error = None
    if metrics is not None:
        on_error = lambda operation: metrics.cache_errors.labels(operation=operation).inc()  # noqa: E731
    return RedisCache(
        url=settings.redis_url, ttl_seconds=settings.cache_ttl_seconds, dtype=settings.cache_dtype, on_error=on_error
    )


def build_pipeline(
    settings: Settings,
    *,
    embedder: Embedder,
    sink: StoreWriter,
    cache: VectorCache | None = None,
    hooks: PipelineHooks | None = None,
) -> Pipeline:
    """The pipeline every entry point runs: the worker, Faust, reembed (the only `Pipeline(...)` call)."""
    return Pipeline(
        embedder=embedder, sink=sink, cache=cache, store_text=settings.store_text, hooks=hooks,
        long_text=settings.long_text, chunk_overlap_tokens=settings.chunk_overlap_tokens,
        embed_retry_seconds=settings.embed_retry_seconds, cache_scope=settings.cache_scope,
    )


def build_worker(
    settings: Settings,
    *,
    embedder: Embedder,
    sink: StoreWriter,
    cache: VectorCache | None = None,
    metrics: Metrics | None = None,
    backend: "Backend | None" = None,
    observer: "WorkerObserver | None" = None,
) -> "Worker":
    """A consumer-group member on these parts (the only `Worker(...)` call).

    `backend`: the Kafka side (default aiokafka; the in-memory broker in tests, a tuned
    `KafkaBackend` in the bench); `observer`: measurement hooks (the bench).
    """
    from streams.runtime import Worker

    if settings.tenant_from and settings.tenancy == "collection":
        from processors.tenant_store import TenantCollections

        sink = TenantCollections(sink, template=settings.collection_template, max_collections=settings.max_tenant_collections)
    pipeline = build_pipeline(settings, embedder=embedder, sink=sink, cache=cache)
    return Worker(settings, pipeline=pipeline, metrics=metrics, observer=observer, backend=backend)


@dataclass
class Parts:
    settings: Settings
    embedder: Embedder
    sink: VectorStore
    cache: VectorCache | None
    metrics: Metrics

    def worker(
        self, *, backend: "Backend | None" = None, observer: "WorkerObserver | None" = None, sink: StoreWriter | None = None,
    ) -> "Worker":
        """A `Worker` on these parts (see `build_worker`); `sink`: a view of `self.sink` to write instead (`pinned_sink`)."""
        return build_worker(
            self.settings, embedder=self.embedder, sink=sink or self.sink, cache=self.cache, metrics=self.metrics,
            backend=backend, observer=observer,
        )

    def pipeline(self) -> Pipeline:
        """A `Pipeline` on these parts (see `build_pipeline`)."""
        return build_pipeline(self.settings, embedder=self.embedder, sink=self.sink, cache=self.cache)


@contextlib.asynccontextmanager
async def assemble(
    settings: Settings,
    *,
    embedder: Embedder | None = None,
    sink: VectorStore | None = None,
    cache: VectorCache | None = None,
    metrics: Metrics | None = None,
) -> AsyncIterator[Parts]:
    """Build the missing parts (the model loads off the event loop), yield them, close what was built here."""
    metrics = metrics or Metrics()
    owned: list[Any] = []
    try:
        if sink is None:
            if not settings.qdrant_url and not settings.qdrant_path:
                log.warning("no EMBEDWORKER_QDRANT_URL or EMBEDWORKER_QDRANT_PATH: vectors are kept in memory only")
            sink = build_sink(settings)
            owned.append(sink)
        if cache is NO_CACHE:
            cache = None
        elif cache is None:
            cache = build_cache(settings, metrics)
            if cache is not None:
                owned.append(cache)
        if embedder is None:
            embedder = await asyncio.get_running_loop().run_in_executor(None, build_embedder, settings)  # seconds of work
            owned.append(embedder)
        yield Parts(settings, embedder, sink, cache, metrics)
    finally:
        await close_all(reversed(owned))


async def close_all(parts: Any) -> None:
    """Close each part (sync or async `close`), the others even when one fails."""
    for part in parts:
        close = getattr(part, "close", None)
        if close is None:
            continue  # the local model holds nothing to release
        try:
            if inspect.isawaitable(result := close()):
                await result
        except Exception as exc:
            log.warning("closing %s failed: %s", type(part).__name__, type(exc).__name__)
