"""Builds the pipeline's parts from `Settings` (the only place that picks implementations)."""

from __future__ import annotations

import os

from processors.cache import RedisCache, VectorCache
from processors.edge_sink import EdgeSink
from processors.embedder import Embedder, SentenceTransformerEmbedder
from processors.sink import QdrantSink, SinkConfigError, parse_payload_indexes
from streams.config import Settings
from streams.metrics import Metrics


def build_embedder(settings: Settings) -> Embedder:
    """The local model, or a client of an embedding server (`EMBEDWORKER_EMBEDDER=http`)."""
    if settings.embedder == "http":
        from processors.http_embedder import HttpEmbedder

        return HttpEmbedder(
            url=settings.embeddings_url,
            model=settings.model,
            api_key=settings.embeddings_api_key or None,
            dimensions=settings.embeddings_dimensions or None,
            max_batch=settings.embeddings_max_batch,
            max_concurrency=settings.embeddings_concurrency,
            encoding=settings.embeddings_encoding,
            retry_seconds=settings.embeddings_retry_seconds,
        )
    return SentenceTransformerEmbedder(model=settings.model, device=settings.device, threads=settings.torch_threads or None)


def build_sink(settings: Settings, collection: str | None = None) -> QdrantSink | EdgeSink:
    """A server (URL), an embedded path store (EMBEDWORKER_QDRANT_ENGINE picks edge or local), or in memory."""
    collection = collection or settings.collection
    if settings.qdrant_path and not settings.qdrant_url and settings.qdrant_engine == "edge":
        return EdgeSink(
            collection=collection, path=settings.qdrant_path, payload_indexes=parse_payload_indexes(settings.payload_indexes),
            sparse=settings.sparse,
        )
    if settings.qdrant_path and not settings.qdrant_url and os.path.isfile(
        os.path.join(settings.qdrant_path, collection, "edge_config.json")
    ):
        raise SinkConfigError(
            f"{settings.qdrant_path} holds qdrant-edge shards: open it with EMBEDWORKER_QDRANT_ENGINE=edge"
        )
    return QdrantSink(
        collection=collection,
        payload_indexes=parse_payload_indexes(settings.payload_indexes),
        url=settings.qdrant_url or None,
        api_key=settings.qdrant_api_key or None,
        path=settings.qdrant_path or None,
        sparse=settings.sparse,
    )


def build_cache(settings: Settings, metrics: Metrics | None = None) -> VectorCache | None:
    if not settings.redis_url:
        return None
    on_error = None
    if metrics is not None:
        on_error = lambda operation: metrics.cache_errors.labels(operation=operation).inc()  # noqa: E731
    return RedisCache(
        url=settings.redis_url, ttl_seconds=settings.cache_ttl_seconds, dtype=settings.cache_dtype, on_error=on_error
    )
