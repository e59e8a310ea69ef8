"""One batch through the pipeline: dedupe, cache lookup, embed misses, cache fill, upsert.

No Kafka here: the runtime hands in decoded events and gets back one `Outcome` per event,
each built from what the stages actually did (`cached`, `truncated`), or an error for a
text the model cannot embed (a poison text, isolated by splitting the batch).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from processors.cache import NullCache, VectorCache
from processors.embedder import Embedder
from processors.sink import Point, VectorSink
from schemas import InputEvent, ResultEvent, content_hash, point_id

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Outcome:
    event: InputEvent
    result: ResultEvent | None = None
    error_kind: str | None = None
    error_message: str | None = None


@dataclass(slots=True)
class PipelineHooks:
    """Callbacks the runtime turns into metrics; the pipeline knows no metrics library."""

    on_cache: Callable[[int, int, int], None] = lambda redis_hits, batch_hits, misses: None
    on_embed: Callable[[int, float], None] = lambda texts, seconds: None
    on_upsert: Callable[[int, float], None] = lambda points, seconds: None
    on_sink_error: Callable[[], None] = lambda: None
    on_sink_state: Callable[[bool], None] = lambda healthy: None


class Backoff:
    """Exponential backoff with full jitter, capped."""

    def __init__(self, *, base_seconds: float = 0.1, cap_seconds: float = 10.0) -> None:
        self.base = base_seconds
        self.cap = cap_seconds

    def delay(self, attempt: int) -> float:
        return random.uniform(0, min(self.cap, self.base * 2**attempt))


class Pipeline:
    """The embedding pipeline for one batch at a time, several batches concurrently.

    Keyword-only settings:
    - `embedder`, `cache` (default: none), `sink`.
    - `store_text`: keep the text in the point payload (default True).
    - `embed_attempts`: tries of a whole batch before it is split to find a poison text (2).
    - `sink_backoff`: retry policy of upserts; upserts retry until they succeed or the
      batch is cancelled, because an unsunk batch must never be committed.
    """

    def __init__(
        self,
        *,
        embedder: Embedder,
        sink: VectorSink,
        cache: VectorCache | None = None,
        store_text: bool = True,
        embed_attempts: int = 2,
        sink_backoff: Backoff | None = None,
        hooks: PipelineHooks | None = None,
    ) -> None:
        self.embedder = embedder
        self.sink = sink
        self.cache: VectorCache = cache or NullCache()
        self.store_text = store_text
        self.embed_attempts = embed_attempts
        self.sink_backoff = sink_backoff or Backoff()
        self.hooks = hooks or PipelineHooks()
        # One thread: the model is not shared between concurrent forward passes, and torch
        # already spreads one pass over the cores.
        self._embed_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed")
        self._previous_upsert: asyncio.Future[None] | None = None
        self._in_flight: dict[str, asyncio.Future[Any]] = {}

    async def start(self) -> None:
        await self.sink.ensure_collection(self.embedder.dim)

    async def close(self) -> None:
        """Release the model thread; the cache and sink belong to whoever built them."""
        self._embed_executor.shutdown(wait=True, cancel_futures=True)

    async def _run_embed(self, texts: Sequence[str]):
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._embed_executor, self.embedder.embed, list(texts))

    async def _embed_isolating_poison(
        self, texts: Sequence[str]
    ) -> tuple[list[np.ndarray | None], list[bool], list[str | None]]:
        """Vectors, truncation flags and per-text error messages (None where embedded)."""
        last_error: Exception | None = None
        for _ in range(self.embed_attempts):
            try:
                started = time.perf_counter()
                result = await self._run_embed(texts)
                self.hooks.on_embed(len(texts), time.perf_counter() - started)
                return list(result.vectors), list(result.truncated), [None] * len(texts)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the model's failure is data about this batch
                last_error = exc
        if len(texts) == 1:
            message = f"{type(last_error).__name__}: {last_error}"[:500]
            log.warning("text could not be embedded after %d attempts: %s", self.embed_attempts, message)
            return [None], [False], [message]
        middle = len(texts) // 2
        left = await self._embed_isolating_poison(texts[:middle])
        right = await self._embed_isolating_poison(texts[middle:])
        return left[0] + right[0], left[1] + right[1], left[2] + right[2]

    async def _truncated_for_cached(self, texts: Sequence[str]) -> list[bool]:
        """Exact truncation flags for cache hits; only texts long enough to matter are tokenized."""
        limit = self.embedder.max_tokens
        flags = [False] * len(texts)
        # A WordPiece token covers at least one character, so shorter texts cannot overflow.
        long_indices = [i for i, text in enumerate(texts) if len(text) > limit - 2]
        if long_indices:
            loop = asyncio.get_running_loop()
            counts = await loop.run_in_executor(
                self._embed_executor, self.embedder.count_tokens, [texts[i] for i in long_indices]
            )
            for index, count in zip(long_indices, counts):
                flags[index] = count > limit
        return flags

    async def _upsert_in_order(self, points: list[Point]) -> None:
        """Upsert after every earlier batch's upsert, retrying with backoff until it lands."""
        loop = asyncio.get_running_loop()
        previous, mine = self._previous_upsert, loop.create_future()
        self._previous_upsert = mine
        try:
            if previous is not None:
                await asyncio.shield(previous)
            attempt = 0
            while True:
                try:
                    started = time.perf_counter()
                    await self.sink.upsert(points)
                    self.hooks.on_upsert(len(points), time.perf_counter() - started)
                    self.hooks.on_sink_state(True)
                    return
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self.hooks.on_sink_error()
                    self.hooks.on_sink_state(False)
                    delay = self.sink_backoff.delay(attempt)
                    log.warning("upsert of %d points failed (%s); retry in %.2fs", len(points), exc, delay)
                    attempt += 1
                    await asyncio.sleep(delay)
        finally:
            if not mine.done():
                mine.set_result(None)

    async def process(self, events: Sequence[InputEvent]) -> list[Outcome]:
        model, dim = self.embedder.name, self.embedder.dim
        # Keyed by the weights, not only the name: new weights under the same name miss.
        version = getattr(self.embedder, "version", None)
        cache_model = f"{model}@{version}" if version else model
        hashes = [content_hash(cache_model, event.text) for event in events]

        # Dedupe: one vector per distinct content, embedded at most once, also across the
        # batches in flight: a text another batch is already looking up or embedding is
        # awaited from it rather than embedded again.
        first_index: dict[str, int] = {}
        for index, digest in enumerate(hashes):
            first_index.setdefault(digest, index)
        unique = list(first_index)
        loop = asyncio.get_running_loop()
        theirs = {d: self._in_flight[d] for d in unique if d in self._in_flight}
        mine = [d for d in unique if d not in theirs]
        for digest in mine:
            self._in_flight[digest] = loop.create_future()

        vectors: dict[str, np.ndarray] = {}
        truncated: dict[str, bool] = {}
        errors: dict[str, str] = {}
        from_cache: set[str] = set()
        try:
            cached_vectors = await self.cache.get_many(mine, dim)
            misses: list[str] = []
            for digest, vector in zip(mine, cached_vectors):
                if vector is None:
                    misses.append(digest)
                else:
                    vectors[digest] = vector
                    from_cache.add(digest)
            if from_cache:
                hit_list = list(from_cache)
                flags = await self._truncated_for_cached([events[first_index[d]].text for d in hit_list])
                truncated.update(zip(hit_list, flags))
            for digest, future in theirs.items():
                known = await asyncio.shield(future)
                if known is None:  # that batch was abandoned: embed it here
                    misses.append(digest)
                    continue
                vector, flag, error = known
                if error is not None:
                    errors[digest] = error
                else:
                    vectors[digest], truncated[digest] = vector, flag
                    from_cache.add(digest)
            if misses:
                miss_texts = [events[first_index[d]].text for d in misses]
                new_vectors, new_truncated, new_errors = await self._embed_isolating_poison(miss_texts)
                fill: list[tuple[str, np.ndarray]] = []
                for digest, vector, flag, error in zip(misses, new_vectors, new_truncated, new_errors):
                    if error is not None:
                        errors[digest] = error
                        continue
                    vectors[digest] = vector
                    truncated[digest] = flag
                    fill.append((digest, vector))
                for digest in mine:
                    future = self._in_flight[digest]
                    if not future.done():
                        future.set_result((vectors.get(digest), truncated.get(digest, False), errors.get(digest)))
                await self.cache.set_many(fill)
        finally:
            for digest in mine:
                future = self._in_flight.pop(digest)
                if not future.done():
                    future.set_result(
                        (vectors[digest], truncated[digest], None) if digest in vectors else
                        (None, False, errors[digest]) if digest in errors else None
                    )

        batch_hits = len(events) - len(unique) + len(theirs.keys() & from_cache)
        self.hooks.on_cache(len(from_cache - theirs.keys()), batch_hits, len(misses))

        # Last write wins for an id repeated in one batch, as it does across batches.
        last_for_id: dict[str, int] = {}
        for index, event in enumerate(events):
            if hashes[index] in vectors:
                last_for_id[event.id] = index
        points = [self._point(events[i], hashes[i], vectors[hashes[i]], truncated[hashes[i]]) for i in last_for_id.values()]
        await self._upsert_in_order(points)

        outcomes: list[Outcome] = []
        seen: set[str] = set()
        for index, event in enumerate(events):
            digest = hashes[index]
            if digest in errors:
                outcomes.append(Outcome(event, error_kind="embed_failed", error_message=errors[digest]))
                continue
            cached = digest in from_cache or digest in seen
            seen.add(digest)
            outcomes.append(
                Outcome(
                    event,
                    result=ResultEvent(
                        id=event.id,
                        point_id=point_id(event.id),
                        collection=self.sink.collection,
                        model=model,
                        dim=dim,
                        cached=cached,
                        truncated=truncated[digest],
                        content_hash=digest,
                    ),
                )
            )
        return outcomes

    def _point(self, event: InputEvent, digest: str, vector: np.ndarray, was_truncated: bool) -> Point:
        payload: dict[str, Any] = {
            "id": event.id,
            "metadata": event.metadata,
            "content_hash": digest,
            "model": self.embedder.name,
            "truncated": was_truncated,
        }
        version = getattr(self.embedder, "version", None)
        if version:
            payload["model_version"] = version
        if self.store_text:
            payload["text"] = event.text
        return Point(id=point_id(event.id), vector=vector, payload=payload)
