"""One batch through the pipeline: chunk, dedupe, cache lookup, embed misses, cache fill, write.

Owns: turning a batch of document writes (upserts and deletes) into store writes and one
`Outcome` per event, each built from what the stages actually did (`cached`, `truncated`,
`chunks`), or an error for a text the model cannot embed (a poison text, isolated by
splitting the batch). Must not: know Kafka (partitions, offsets, publishing).

Order: a batch writes in its `Turn` (see `processors.ordering`), taken when it is launched,
so for every id the store ends with its last event in launch (offset) order, whatever
finishes first. Within a batch, the last event of an id is the one written. A document's
write replaces its whole chunk set (upsert chunks 0..n-1, delete chunks >= n); a delete is
the same write with n = 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, Callable, ContextManager, Sequence

import numpy as np

from processors.backoff import Backoff
from processors.cache import NullCache, VectorCache
from processors.chunking import Chunk, plan_chunks
from processors.embedder import Embedder
from processors.errors import ModelRefusesEverything, StoreRejected
from processors.ordering import Sequencer, Turn
from processors.sink import TENANT_FIELD, DocumentWrite, Point, StoreWriter, version_payload

CACHE_SCOPE_TENANT, CACHE_SCOPE_GLOBAL = "tenant", "global"
from schemas import DeleteResult, InputEvent, ResultEvent, Version, content_hash, normalize_text, point_id

__all__ = ["Backoff", "LONG_TEXT_CHUNK", "LONG_TEXT_TRUNCATE", "Outcome", "Pipeline", "PipelineHooks"]

LONG_TEXT_CHUNK = "chunk"
LONG_TEXT_TRUNCATE = "truncate"

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Outcome:
    event: InputEvent
    result: ResultEvent | DeleteResult | None = None
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
    on_model_error: Callable[[], None] = lambda: None
    on_cache_invalid: Callable[[int], None] = lambda values: None
    """Cached values refused (not finite, not of unit norm) and embedded again."""
    on_store_rejected: Callable[[int], None] = lambda documents: None
    on_stale: Callable[[int], None] = lambda documents: None
    """Writes skipped because the store held a newer version of the document (never an error)."""
    on_payload_only: Callable[[int], None] = lambda documents: None
    """Updates whose text was unchanged: the payload rewritten, the stored vector kept."""
    phase: Callable[[str], ContextManager[Any]] = lambda name: contextlib.nullcontext()
    """A context around each phase (cache.lookup, embed, cache.fill, store.write): tracing spans."""


class Pipeline:
    """The embedding pipeline for one batch at a time, several batches concurrently.

    Keyword-only settings:
    - `embedder`, `cache` (default: none), `sink`.
    - `store_text`: keep the text in the point payload (default True).
    - `embed_attempts`: tries of a batch before it is split to find a poison text (2).
    - `embed_retry_seconds`: how long a failing batch is retried, with backoff, before a
      probe text decides between a poison text (split the batch) and a model outage (wait) (1).
    - `sink_backoff`: retry policy of writes; writes retry until they succeed, the batch is
      cancelled or its events are fenced, because an unwritten batch must never be committed.
    - `long_text`: `chunk` (default: a text over the model's limit becomes several points)
      or `truncate` (one point of its first `max_tokens` tokens, `truncated: true`).
    - `chunk_overlap_tokens`: tokens a chunk repeats from the end of the previous one (32).
    - `cache_scope`: `tenant` (default): an event with a tenant hashes its texts with the tenant,
      so the cache, the batch's dedupe and `cached: true` never cross tenants; `global` shares them.
    """

    def __init__(
        self,
        *,
        embedder: Embedder,
        sink: StoreWriter,
        cache: VectorCache | None = None,
        store_text: bool = True,
        embed_attempts: int = 2,
        embed_retry_seconds: float = 1.0,
        sink_backoff: Backoff | None = None,
        hooks: PipelineHooks | None = None,
        long_text: str = LONG_TEXT_CHUNK,
        chunk_overlap_tokens: int = 32,
        cache_scope: str = CACHE_SCOPE_TENANT,
    ) -> None:
        if long_text not in (LONG_TEXT_CHUNK, LONG_TEXT_TRUNCATE):
            raise ValueError(f"long_text must be {LONG_TEXT_CHUNK} or {LONG_TEXT_TRUNCATE}, not {long_text!r}")
        self.embedder = embedder
        self.sink = sink
        self.cache: VectorCache = cache or NullCache()
        self.store_text = store_text
        self.cache_scope = cache_scope
        self.embed_attempts = embed_attempts
        self.embed_retry_seconds = embed_retry_seconds
        self.embed_backoff = Backoff(base_seconds=0.05, cap_seconds=2.0)
        self.sink_backoff = sink_backoff or Backoff()
        self.hooks = hooks or PipelineHooks()
        # One thread: the model is not shared between concurrent forward passes, and torch
        # already spreads one pass over the cores.
        self._embed_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed")
        self._in_flight: dict[str, asyncio.Future[Any]] = {}
        self.long_text = long_text
        self.chunk_overlap_tokens = chunk_overlap_tokens
        self.writes = Sequencer()
        self._writing: asyncio.Future[int] | None = None
        self._special_tokens = int(embedder.special_tokens)
        # Keyed by the weights, not only the name: new weights under the same name miss.
        self._version = embedder.version
        self._cache_model = f"{embedder.name}@{self._version}" if self._version else embedder.name

    async def start(self) -> None:
        await self.sink.ensure_collection(self.embedder.dim, model=self.embedder.name, model_version=self._version)

    async def close(self) -> None:
        """Release the model thread; the cache and sink belong to whoever built them."""
        self._embed_executor.shutdown(wait=True, cancel_futures=True)

    async def _embed_once(
        self, texts: Sequence[str], token_counts: Sequence[int] | None, *, probing: bool = False
    ) -> tuple[list[np.ndarray | None], list[str | None]]:
        started = time.perf_counter()
        with self.hooks.phase("embed"):
            result = await self._on_model_thread(self.embedder.embed, list(texts), token_counts)
        self.hooks.on_embed(len(texts), time.perf_counter() - started)
        # fp16 on CUDA can overflow: a non-finite vector is that text's failure, never a stored point.
        finite = _finite_rows(result.vectors)
        if not finite.all():
            bad = {int(i): "the model gave a non-finite vector for this text" for i in np.flatnonzero(~finite)}
            result = replace(result, rejected={**bad, **result.rejected})
        if not result.rejected:
            return list(result.vectors), [None] * len(texts)
        # A model that refuses every text is misconfigured (e.g. dimensions it cannot give), not
        # fed poison: if it refuses the probe too, this is an outage and nothing is dead-lettered.
        reason = next(iter(result.rejected.values()))
        if probing or (await self._on_model_thread(self.embedder.embed, [_PROBE_TEXT], None)).rejected:
            raise ModelRefusesEverything(f"the model refuses even a probe text: {reason[:200]}")
        for message in result.rejected.values():
            log.warning("text refused by the model: %s", message[:200])
        vectors = [None if i in result.rejected else v for i, v in enumerate(result.vectors)]
        return vectors, [result.rejected.get(i) for i in range(len(texts))]

    async def _embed_isolating_poison(
        self, texts: Sequence[str], token_counts: Sequence[int] | None = None, *, whole: bool = True
    ) -> tuple[list[np.ndarray | None], list[str | None]]:
        """Vectors and per-text error messages (None where embedded).

        A model outage must not dead-letter valid input: a failing batch is first retried
        with backoff for `embed_retry_seconds`; then a probe text decides. If it embeds, the
        model works and the batch holds a poison text: it is split in halves to find it, and
        only a text that fails alone is dead-lettered. If the probe fails too, the model is
        down: the batch waits for it (one log line, `embedworker_model_errors_total`) and is
        retried whole. Out-of-memory splits at once (a smaller forward pass), never a failure.
        """
        last_error: Exception | None = None
        while True:
            deadline = time.monotonic() + (self.embed_retry_seconds if whole else 0.0)
            attempt = 0
            while True:
                try:
                    return await self._embed_once(texts, token_counts)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # the model's failure is data about this batch
                    last_error = exc
                    attempt += 1
                    self.hooks.on_model_error()
                if _out_of_memory(last_error) and len(texts) > 1:
                    break
                if attempt >= self.embed_attempts and time.monotonic() >= deadline:
                    break
                await asyncio.sleep(self.embed_backoff.delay(attempt))
            if _out_of_memory(last_error) and len(texts) > 1:
                break  # a smaller forward pass, not a poison search
            # Poison in the batch, or the model down? A probe text tells them apart.
            if await self._model_works():
                break
            await self._wait_for_a_working_model(last_error)
        if len(texts) == 1:
            message = f"{type(last_error).__name__}: {last_error}"[:500]
            log.warning("text could not be embedded (the model embeds others): %s", message)
            return [None], [message]
        middle = len(texts) // 2
        left_counts = None if token_counts is None else token_counts[:middle]
        right_counts = None if token_counts is None else token_counts[middle:]
        left = await self._embed_isolating_poison(texts[:middle], left_counts, whole=False)
        right = await self._embed_isolating_poison(texts[middle:], right_counts, whole=False)
        return left[0] + right[0], left[1] + right[1]

    async def _model_works(self) -> bool:
        try:
            await self._embed_once([_PROBE_TEXT], None, probing=True)
            return True
        except asyncio.CancelledError:
            raise
        except Exception:
            self.hooks.on_model_error()
            return False

    async def _wait_for_a_working_model(self, error: Exception | None) -> None:
        """Return once a probe text embeds; until then the model is down, not the text poison."""
        attempt, logged = 0, False
        while True:
            try:
                await self._embed_once([_PROBE_TEXT], None, probing=True)
                if logged:
                    log.info("the model works again")
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.hooks.on_model_error()
                if not logged:
                    log.error("the model fails on every text (%s: %s); holding the batch until it recovers",
                              type(exc).__name__, str(exc)[:200])
                    logged = True
            attempt += 1
            await asyncio.sleep(self.embed_backoff.delay(attempt))

    def take_turn(self) -> Turn:
        """This batch's place in the write order; take it when the batch is launched."""
        return self.writes.take()

    async def settle(self, timeout: float | None = None) -> bool:
        """Wait for a store write already sent (it cannot be called back); True when none is left."""
        writing = self._writing
        if writing is None or writing.done():
            return True
        done, _ = await asyncio.wait([writing], timeout=timeout)
        return bool(done)

    async def process(
        self,
        events: Sequence[InputEvent],
        *,
        turn: Turn | None = None,
        live: Callable[[int], bool] | None = None,
        versions: Sequence[Version | None] | None = None,
    ) -> list[Outcome]:
        """One outcome per event; the batch's writes land after those of every earlier turn.

        `turn`: taken at launch (`take_turn`); None takes one now. `live(i)`: whether event i
        may still be written (False once its partition is revoked); checked before each write
        attempt, so a fenced event is never written, and the caller must not publish for it.
        `versions[i]`: event i's version for the store's guard (None: unconditional writes).
        """
        turn = turn if turn is not None else self.writes.take()
        try:
            prepared = await self._prepare(events)
            async with turn:
                rejected = await self._write(events, prepared, live, versions)
        finally:
            turn.end()
        return self._outcomes(events, prepared, rejected)

    async def _on_model_thread(self, function: Callable[..., Any], *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._embed_executor, function, *args)

    async def _split(self, texts: dict[int, str]) -> tuple[dict[int, list[Chunk]], dict[int, bool]]:
        """Each text's chunks (one unless chunking a long text) and truncation flags.

        Only texts long enough to overflow are tokenized: a WordPiece token covers at least
        one character, so a text of at most `limit` characters fits.
        """
        limit = self.embedder.max_tokens - self._special_tokens
        chunks = {i: [Chunk(text=t, start=0, end=len(t), tokens=-1)] for i, t in texts.items()}
        truncated = dict.fromkeys(texts, False)
        per_char = self.embedder.max_tokens_per_char
        long = [i for i, t in texts.items() if per_char is None or len(t) * per_char > limit]
        if long:
            offsets = await self._on_model_thread(self.embedder.token_offsets, [texts[i] for i in long])
            for i, spans in zip(long, offsets):
                if self.long_text == LONG_TEXT_CHUNK:
                    chunks[i] = plan_chunks(texts[i], spans, max_tokens=limit, overlap_tokens=self.chunk_overlap_tokens)
                else:
                    chunks[i] = [Chunk(text=texts[i], start=0, end=len(texts[i]), tokens=min(len(spans), limit))]
                    truncated[i] = len(spans) > limit
        return chunks, truncated

    def _unit_model(self, event: InputEvent) -> str:
        """What a text's hash is taken with: the model, and the tenant where the cache is scoped per tenant."""
        if event.tenant is None or self.cache_scope != CACHE_SCOPE_TENANT:
            return self._cache_model
        return f"{self._cache_model}\x00tenant\x00{event.tenant}"

    async def _prepare(self, events: Sequence[InputEvent]) -> "_Prepared":
        dim = self.embedder.dim
        cache_model = self._cache_model
        texts = {i: normalize_text(e.text) for i, e in enumerate(events) if not e.is_delete}
        chunks, truncated = await self._split(texts)
        # One unit per chunk; the cache and the dedupe work on units.
        unit_hashes = {i: [content_hash(self._unit_model(events[i]), c.text) for c in cs] for i, cs in chunks.items()}
        unit_text: dict[str, str] = {}
        unit_tokens: dict[str, int] = {}
        for i, cs in chunks.items():
            for digest, chunk in zip(unit_hashes[i], cs):
                if digest not in unit_text:
                    unit_text[digest] = chunk.text
                    unit_tokens[digest] = chunk.tokens
        unique = list(unit_text)

        # Dedupe: one vector per distinct content, embedded at most once, also across the
        # batches in flight: a text another batch is already looking up or embedding is
        # awaited from it rather than embedded again.
        loop = asyncio.get_running_loop()
        theirs = {d: self._in_flight[d] for d in unique if d in self._in_flight}
        mine = [d for d in unique if d not in theirs]
        for digest in mine:
            self._in_flight[digest] = loop.create_future()

        vectors: dict[str, np.ndarray] = {}
        errors: dict[str, str] = {}
        from_cache: set[str] = set()
        misses: list[str] = []
        try:
            with self.hooks.phase("cache.lookup"):
                cached_vectors = await self.cache.get_many(mine, dim)
            refused = 0
            for digest, vector in zip(mine, cached_vectors):
                if vector is not None and not usable_vector(vector, dim):
                    vector, refused = None, refused + 1
                if vector is None:
                    misses.append(digest)
                else:
                    vectors[digest] = vector
                    from_cache.add(digest)
            if refused:
                # Corruption, an old bug or another writer on a shared Redis (the keys are predictable).
                log.warning("%d cached vectors were not finite unit vectors: embedding them again", refused)
                self.hooks.on_cache_invalid(refused)
            for digest, future in theirs.items():
                known = await asyncio.shield(future)
                if known is None:  # that batch was abandoned: embed it here
                    misses.append(digest)
                    continue
                vector, error = known
                if error is not None:
                    errors[digest] = error
                else:
                    vectors[digest] = vector
                    from_cache.add(digest)
            if misses:
                miss_texts = [unit_text[d] for d in misses]
                counts = [unit_tokens[d] for d in misses]
                known_counts = None if min(counts) < 0 else [c + self._special_tokens for c in counts]
                new_vectors, new_errors = await self._embed_isolating_poison(miss_texts, known_counts)
                fill: list[tuple[str, np.ndarray]] = []
                for digest, vector, error in zip(misses, new_vectors, new_errors):
                    if error is not None:
                        errors[digest] = error
                        continue
                    vectors[digest] = vector
                    fill.append((digest, vector))
                for digest in mine:
                    future = self._in_flight[digest]
                    if not future.done():
                        future.set_result((vectors.get(digest), errors.get(digest)))
                with self.hooks.phase("cache.fill"):
                    await self.cache.set_many(fill)
        finally:
            for digest in mine:
                future = self._in_flight.pop(digest)
                if not future.done():
                    future.set_result(
                        (vectors[digest], None) if digest in vectors else
                        (None, errors[digest]) if digest in errors else None
                    )
        units = sum(len(h) for h in unit_hashes.values())
        batch_hits = units - len(unique) + len(theirs.keys() & from_cache)
        self.hooks.on_cache(len(from_cache - theirs.keys()), batch_hits, len(misses))
        return _Prepared(texts, chunks, truncated, unit_hashes, vectors, errors, from_cache)

    def _document_writes(
        self, events: Sequence[InputEvent], p: "_Prepared", versions: Sequence[Version | None] | None
    ) -> list[tuple[int, DocumentWrite]]:
        """The batch's writes: for each id, its last event that can be applied (a delete or an embedded upsert)."""
        last_for_id: dict[str, int] = {}
        for index, event in enumerate(events):
            if event.is_delete or not any(d in p.errors for d in p.unit_hashes[index]):
                last_for_id[event.key] = index
        writes: list[tuple[int, DocumentWrite]] = []
        for index in last_for_id.values():
            event = events[index]
            version = versions[index] if versions is not None else None
            if event.is_delete:
                writes.append((index, DocumentWrite(doc_id=event.id, points=(), version=version, tenant=event.tenant)))
                continue
            chunks = p.chunks[index]
            guard = version_payload(version)
            points = tuple(
                self._point(event, j, len(chunks), chunk, digest, p.vectors[digest], p.truncated[index], guard)
                for j, (chunk, digest) in enumerate(zip(chunks, p.unit_hashes[index]))
            )
            writes.append((index, DocumentWrite(doc_id=event.id, points=points, version=version, tenant=event.tenant)))
        return writes

    async def _write(
        self, events: Sequence[InputEvent], p: "_Prepared", live: Callable[[int], bool] | None,
        versions: Sequence[Version | None] | None = None,
    ) -> dict[int, str]:
        """Apply the writes, retrying with backoff until they land; fenced events drop out before each try.

        A write the store refuses on its merits (`StoreRejected`: a validation error, a 400/422)
        is split in halves until the documents it refuses alone are found: those are returned
        (event index -> the engine's reason) to become dead letters, the rest are written.
        Deployment errors (a deleted collection, a wrong API key: 401/403/404) are not refusals
        on a document's merits: they are held and retried like any outage, nothing dead-lettered;
        a refusal of everything that slips through that rule trips the dead-letter breaker.
        """
        writes = self._document_writes(events, p, versions)
        rejected: dict[int, str] = {}
        attempt = 0
        while True:
            alive = [(i, w) for i, w in writes if (live is None or live(i)) and i not in rejected]
            if not alive:
                if attempt:
                    # No write of ours is failing any more: an unhealthy mark left here would
                    # pause the consumer with nothing to retry, for good.
                    self.hooks.on_sink_state(True)
                return rejected
            try:
                try:
                    await self._send(alive)
                except StoreRejected:
                    found = await self._isolate_rejected(alive, live)
                    for reason in found.values():
                        log.warning("the store refused a document: %s", reason[:300])
                    self.hooks.on_store_rejected(len(found))
                    rejected.update(found)
                    self.hooks.on_sink_state(True)
                    return rejected  # the others were written while isolating
                self.hooks.on_sink_state(True)
                return rejected
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.hooks.on_sink_error()
                self.hooks.on_sink_state(False)
                delay = self.sink_backoff.delay(attempt)
                log.warning("write of %d documents failed (%s); retry in %.2fs", len(alive), exc, delay)
                attempt += 1
                await asyncio.sleep(delay)

    async def _send(self, writes: Sequence[tuple[int, DocumentWrite]]) -> None:
        """One store write, timed and traced; once sent it runs to its end even if the batch is cancelled (`settle`)."""
        started = time.perf_counter()
        with self.hooks.phase("store.write"):
            self._writing = asyncio.ensure_future(self.sink.write([w for _, w in writes]))
            report = await asyncio.shield(self._writing)
        self.hooks.on_upsert(sum(len(w.points) for _, w in writes), time.perf_counter() - started)
        if report.stale:
            self.hooks.on_stale(report.stale)
        if report.payload_only:
            self.hooks.on_payload_only(report.payload_only)

    async def _isolate_rejected(
        self, writes: Sequence[tuple[int, DocumentWrite]], live: Callable[[int], bool] | None
    ) -> dict[int, str]:
        """Write what the store accepts, halving the refused parts; the documents refused alone (index -> reason).

        Any other error propagates: the caller retries the whole batch (writes are idempotent).
        """
        writes = [(i, w) for i, w in writes if live is None or live(i)]
        if not writes:
            return {}
        try:
            await self._send(writes)
            return {}
        except StoreRejected as exc:
            if len(writes) == 1:
                return {writes[0][0]: str(exc)}
        middle = len(writes) // 2
        return {**await self._isolate_rejected(writes[:middle], live), **await self._isolate_rejected(writes[middle:], live)}

    def _outcomes(self, events: Sequence[InputEvent], p: "_Prepared", rejected: dict[int, str]) -> list[Outcome]:
        model, dim = self.embedder.name, self.embedder.dim
        outcomes: list[Outcome] = []
        seen: set[str] = set()
        for index, event in enumerate(events):
            if index in rejected:
                outcomes.append(Outcome(event, error_kind="store_rejected", error_message=rejected[index]))
                continue
            if event.is_delete:
                outcomes.append(Outcome(event, result=DeleteResult(id=event.id, collection=self.sink.collection, tenant=event.tenant)))
                continue
            digests = p.unit_hashes[index]
            failed = next((p.errors[d] for d in digests if d in p.errors), None)
            if failed is not None:
                outcomes.append(Outcome(event, error_kind="embed_failed", error_message=failed))
                continue
            cached = all(d in p.from_cache or d in seen for d in digests)
            seen.update(digests)
            outcomes.append(
                Outcome(
                    event,
                    result=ResultEvent(
                        id=event.id,
                        point_id=point_id(event.key),
                        collection=self.sink.collection,
                        model=model,
                        dim=dim,
                        cached=cached,
                        truncated=p.truncated[index],
                        content_hash=digests[0] if len(digests) == 1 else content_hash(self._unit_model(event), p.texts[index]),
                        chunks=len(digests),
                        tenant=event.tenant,
                    ),
                )
            )
        return outcomes

    def _point(
        self, event: InputEvent, index: int, count: int, chunk: Chunk, digest: str, vector: np.ndarray, was_truncated: bool,
        guard: dict[str, Any],
    ) -> Point:
        payload: dict[str, Any] = {
            "id": event.id,
            "chunk_index": index,
            "chunk_count": count,
            "chunk_start": chunk.start,
            "chunk_end": chunk.end,
            "metadata": event.metadata,
            "content_hash": digest,
            "model": self.embedder.name,
            "truncated": was_truncated,
            **guard,
        }
        if self._version:
            payload["model_version"] = self._version
        if event.tenant is not None:
            payload[TENANT_FIELD] = event.tenant
        if self.store_text:
            # A one-chunk document keeps its text as sent; a chunk, its span of the normalized text.
            payload["text"] = event.text if count == 1 else chunk.text
        # The chunk's text rides along for the sink's sparse (BM25) vector, stored text or not.
        return Point(id=point_id(event.key, index), vector=vector, payload=payload, text=chunk.text)


_PROBE_TEXT = "a probe text to tell a failing model from a poison text"


def _finite_rows(vectors: Any) -> np.ndarray:
    """Which vectors hold only finite values (one vectorized pass for the usual 2-D array)."""
    if isinstance(vectors, np.ndarray) and vectors.ndim == 2:
        return np.isfinite(vectors).all(axis=1)
    return np.array([bool(np.isfinite(np.asarray(v, dtype=np.float32)).all()) for v in vectors], dtype=bool)


def usable_vector(vector: np.ndarray, dim: int) -> bool:
    """A vector the pipeline may store: `dim` finite values of unit norm (every embedder here normalizes)."""
    if vector.shape != (dim,) or not np.isfinite(vector).all():
        return False
    return abs(float(np.dot(vector, vector)) - 1.0) <= 0.02  # float16 cache entries are ~1e-3 off


def _out_of_memory(exc: BaseException | None) -> bool:
    """CUDA (or MPS) out of memory: the batch was too big, not the text bad."""
    name = type(exc).__name__
    return name == "OutOfMemoryError" or (exc is not None and "out of memory" in str(exc).lower())


@dataclass(slots=True)
class _Prepared:
    """What a batch learned before its turn to write: chunks, vectors, failures (by unit hash)."""

    texts: dict[int, str]
    chunks: dict[int, list[Chunk]]
    truncated: dict[int, bool]
    unit_hashes: dict[int, list[str]]
    vectors: dict[str, np.ndarray]
    errors: dict[str, str]
    from_cache: set[str]
