"""Builds the pipeline's parts from `Settings` (the only place that picks implementations)."""

from __future__ import annotations

from processors.cache import RedisCache, VectorCache
from processors.embedder import SentenceTransformerEmbedder
from processors.sink import QdrantSink
from streams.config import Settings
from streams.metrics import Metrics


def build_embedder(settings: Settings) -> SentenceTransformerEmbedder:
    return SentenceTransformerEmbedder(model=settings.model, device=settings.device)


def build_sink(settings: Settings) -> QdrantSink:
    return QdrantSink(
        collection=settings.collection,
        url=settings.qdrant_url or None,
        api_key=settings.qdrant_api_key or None,
        path=settings.qdrant_path or None,
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
