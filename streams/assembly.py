"""The one place that assembles a worker's parts from `Settings`, and closes what it built.

Owns: which embedder, store and cache a run gets (through `streams.factory`) and their
lifetime. Used by the CLI, the demo, the Faust app, the bench and the tests. Must not:
run anything; parts handed in are used as they are and left open for their owner.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from dataclasses import dataclass
from typing import Any, AsyncIterator

from processors.cache import VectorCache
from processors.embedder import Embedder
from processors.sink import VectorSink
from streams.config import Settings
from streams.metrics import Metrics

log = logging.getLogger(__name__)

NO_CACHE: Any = object()
"""Pass as `cache` for a run without the Redis cache even when `redis_url` is set."""


@dataclass
class Parts:
    settings: Settings
    embedder: Embedder
    sink: VectorSink
    cache: VectorCache | None
    metrics: Metrics

    def worker(self, **kwargs: Any) -> Any:
        """A `Worker` on these parts (`observer`, `backend`: see `streams.runtime.Worker`)."""
        from streams.runtime import Worker

        return Worker(self.settings, embedder=self.embedder, sink=self.sink, cache=self.cache, metrics=self.metrics, **kwargs)


@contextlib.asynccontextmanager
async def assemble(
    settings: Settings,
    *,
    embedder: Embedder | None = None,
    sink: VectorSink | None = None,
    cache: VectorCache | None = None,
    metrics: Metrics | None = None,
) -> AsyncIterator[Parts]:
    """Build the missing parts (the model loads off the event loop), yield them, close what was built here."""
    from streams.factory import build_cache, build_embedder, build_sink

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
        for part in reversed(owned):
            close = getattr(part, "close", None)
            if close is None:
                continue  # the local model holds nothing to release
            try:
                if inspect.isawaitable(result := close()):
                    await result
            except Exception as exc:  # close the others anyway
                log.warning("closing %s failed: %s", type(part).__name__, type(exc).__name__)
