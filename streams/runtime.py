"""The main runtime: fetch, pause, rebalance, commit, drain; the steps do the rest.

A message's life: fetched and registered in the `OffsetTracker`; then through the steps
(`streams/steps/`): `Decode` (bad input goes straight to `DeadLetters`; a tombstone or
`"op": "delete"` is a delete), `Batch`, `EmbedAndStore` (the `Pipeline`, up to
`max_in_flight_batches` batches at once, so fetching, cache lookups, embedding and writes of
different batches overlap), `Publish` (its result or dead letter is acknowledged) and
`Finish`; the commit loop commits the finished prefix of each partition. Crashes therefore
replay, never drop.

Owns: the consumer (fetching, pausing on the `FlowController`'s signals, rebalances,
commits, lag) and the drain on shutdown. Must not: decode, batch, embed or publish itself.

Order: a batch takes two turns when it is launched, one for the store and one for the
result topic, so writes and results follow offset order whichever batch finishes first.
Fencing: every message carries the epoch of its partition's assignment; once a partition
is revoked, its messages are neither written, nor published, nor finished here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import psutil
from aiokafka import ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import IllegalStateError, KafkaError

from processors.embedder import estimate_tokens
from processors.pipeline import LONG_TEXT_CHUNK, Outcome, Pipeline, PipelineHooks
from schemas import REPLAY_COUNT_HEADER, InputEvent, Limits
from streams.backends import Backend
from streams.backends.kafka import REBALANCE_TIMEOUT_MS, KafkaBackend
from streams.batching import BatchPolicy, Batcher
from streams.breaker import DeadLetterBreaker, DeadLetterLimit
from streams.config import ConfigError, Settings
from streams.flow import FlowController, FlowSignals, Watermarks
from streams.memory import release_free_memory, tune_allocator
from streams.metrics import PAUSE_REASONS, Metrics
from streams.offsets import OffsetTracker
from streams.steps import Fetched
from streams.steps.batch import Batch
from streams.steps.decode import Decode
from streams.steps.embed_store import EmbedAndStore
from streams.steps.finish import Finish
from streams.steps.publish import DeadLetters, Publish, Publisher, PublishError as _PublishError
from streams.tracing import Tracing

log = logging.getLogger(__name__)

_POLL_SECONDS = 0.1
_TRIM_INTERVAL_SECONDS = 0.2
_LOGGED_PAUSE_SECONDS = 1.0
"""Pauses shorter than this are counted but logged at DEBUG: a fast pipeline pauses often and briefly."""

__all__ = ["Fetched", "PublishError", "RunStats", "Worker", "WorkerError", "WorkerObserver"]


@dataclass(slots=True)
class RunStats:
    """Totals for summaries (the demo, benchmarks); Prometheus has the same as metrics."""

    consumed: int = 0
    processed: int = 0
    cached: int = 0
    truncated: int = 0
    dead_letters: int = 0
    batches: int = 0
    batch_sizes: deque[int] = field(default_factory=lambda: deque(maxlen=10_000))
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=50_000))
    pauses: int = 0
    resumes: int = 0
    pause_reasons: dict[str, int] = field(default_factory=dict)
    max_rss_bytes: int = 0


@dataclass(slots=True)
class WorkerObserver:
    """Public hooks for measurements (the bench): called on the event loop, so keep them cheap."""

    on_fetch_round: Callable[[], None] = lambda: None
    on_consumed: Callable[[], None] = lambda: None
    on_batch_done: Callable[[int], None] = lambda messages: None
    on_published: Callable[[list[tuple[TopicPartition, int]]], None] = lambda positions: None
    """Results acknowledged by the broker: (partition, offset) of each input message."""
    on_revoked: Callable[[list[TopicPartition]], None] = lambda partitions: None
    """Partitions fenced: called as the revoke handler returns."""


class WorkerError(Exception):
    """A fault the worker cannot go on from; it stops and the next start replays."""


class PublishError(WorkerError, _PublishError):
    """A record the broker will never accept (not retriable) and that has no smaller form."""


class _RebalanceListener(ConsumerRebalanceListener):
    """What must be committed on a rebalance.

    Revoked: every finished message of the revoked partitions is committed before they
    go, after giving in-flight batches until `shutdown_timeout_seconds / 2` to finish, so
    the next owner neither loses nor needlessly repeats work. Then the partitions are
    fenced: no batch writes, publishes or finishes their messages any more, and a store
    write already sent is waited for, so nothing of ours lands after the new owner's.
    Buffered messages not yet in a batch are dropped: the next owner replays them from
    the committed offset, as it replays the fenced ones.
    Assigned: the group's committed offset is read so lag can be computed at once.
    """

    def __init__(self, worker: "Worker") -> None:
        self._worker = worker

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        await self._worker._on_revoked(list(revoked))

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        await self._worker._on_assigned(list(assigned))


class Worker:
    """One consumer-group member running the embedding pipeline.

    Built by `streams.assembly.build_worker`. Keyword-only: `pipeline` (its hooks become the
    worker's metrics), `metrics` (default: a fresh registry), `observer` (measurement hooks),
    `backend` (default: aiokafka; `streams.backends.memory.MemoryBroker` in unit tests).
    `settings` carries everything else (see `streams.config.OPTIONS`).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        pipeline: Pipeline,
        metrics: Metrics | None = None,
        observer: WorkerObserver | None = None,
        backend: Backend | None = None,
    ) -> None:
        if settings.shutdown_timeout_seconds / 2 >= REBALANCE_TIMEOUT_MS / 1000:
            raise ConfigError(
                "EMBEDWORKER_SHUTDOWN_TIMEOUT_SECONDS",
                f"half of it (the revoke wait) must stay below the rebalance timeout ({REBALANCE_TIMEOUT_MS // 1000} s)",
            )
        self.settings = settings
        self.backend: Backend = backend or KafkaBackend()
        self.observer = observer or WorkerObserver()
        self.metrics = metrics or Metrics()
        self.stats = RunStats()
        self.pipeline = pipeline
        self.embedder = pipeline.embedder
        m = self.metrics
        self._sink_healthy = True
        self.tracing = Tracing(enabled=settings.tracing)
        # The worker's telemetry rides on the pipeline it is given (built by `streams.assembly`).
        pipeline.hooks = PipelineHooks(
            on_cache=self._count_cache,
            on_embed=lambda texts, seconds: (m.texts_embedded.inc(texts), m.embed_seconds.observe(seconds)),
            on_upsert=lambda points, seconds: (m.chunks_written.inc(points), m.upsert_seconds.observe(seconds)),
            on_sink_error=m.sink_errors.inc,
            on_sink_state=self._set_sink_state,
            on_model_error=m.model_errors.inc,
            on_cache_invalid=m.cache_invalid.inc,
            on_store_rejected=m.store_rejected.inc,
            on_stale=m.stale_writes_skipped.inc,
            phase=self.tracing.phase,
        )
        self._epochs: dict[TopicPartition, int] = {}
        self._next_epoch = 1
        # W3C trace context always travels with a message; other headers only when named.
        # The replay count too: a replayed event that fails again must carry it to its next dead letter.
        self._pass_headers = frozenset(
            {"traceparent", "tracestate", REPLAY_COUNT_HEADER, *settings.pass_headers.split(",")} - {""}
        )
        self.breaker = DeadLetterBreaker(limit=DeadLetterLimit(
            max_ratio=settings.dlq_max_ratio, window=settings.dlq_window, max_consecutive=settings.dlq_max_consecutive,
        ))
        self._held: list[Fetched] = []
        """Would-be dead letters held while the breaker is open: unfinished, so never committed past."""
        self.limits = Limits(max_message_bytes=settings.max_message_bytes, max_text_bytes=settings.max_text_bytes)
        self.tracker = OffsetTracker()
        self.batcher: Batcher[Fetched] = Batcher(
            BatchPolicy(
                min_messages=settings.batch_min_messages,
                max_messages=settings.batch_max_messages,
                min_tokens=settings.batch_min_tokens,
                max_tokens=settings.batch_max_tokens,
                min_wait_seconds=settings.batch_min_wait_ms / 1000,
                max_wait_seconds=settings.batch_max_wait_ms / 1000,
                low_lag=settings.lag_low,
                high_lag=settings.lag_high,
            )
        )
        depth = settings.max_in_flight_batches
        budget = settings.memory_budget_bytes
        self.flow = FlowController(
            buffered_messages=Watermarks(high=settings.buffer_max_messages, low=settings.buffer_max_messages * 0.5),
            buffered_bytes=Watermarks(high=settings.buffer_max_bytes, low=settings.buffer_max_bytes * 0.5),
            # Closed batches waiting for a pipeline slot, beyond one pipeline's depth.
            in_flight_batches=Watermarks(high=2 * depth, low=depth),
            memory_bytes=Watermarks(high=0.9 * budget, low=0.8 * budget) if budget else None,
        )

        # The steps, built back to front: each hands its work to the next.
        self.finish = Finish(tracker=self.tracker)
        self.publisher = Publisher(
            send=lambda topic, key, value, headers=(): self._producer.send(topic, value=value, key=key, headers=headers),
            send_many=lambda topic, records: self._producer.send_many(topic, records),
            on_error=lambda kind, error: m.publish_errors.labels(kind=kind, error=error).inc(),
        )
        self.publish = Publish(
            publisher=self.publisher, finish=self.finish, live=self.live,
            output_topic=settings.output_topic, dlq_topic=settings.dlq_topic,
            dlq_max_payload_bytes=settings.dlq_max_payload_bytes,
            on_results=self._count_results, on_dead_letters=self._count_dead_letters,
            admit_dead_letter=self._admit_dead_letter,
        )
        self.dead_letters = DeadLetters(publish=self.publish, on_error=self._fail)
        self.embed_store = EmbedAndStore(
            pipeline=self.pipeline, publish=self.publish, live=self.live, depth=depth, on_error=self._fail,
            on_slot_free=lambda: self.batch.poll(), on_batch=self._count_batch, on_batch_done=self._batch_done,
            tracing=self.tracing, versioned=settings.version_guard,
        )
        self.batch = Batch(batcher=self.batcher, next_step=self.embed_store)
        self.decode = Decode(
            next_step=self.batch, dead_letters=self.dead_letters, limits=self.limits, tokens=self._tokens,
            on_decoded=lambda item: self.breaker.record_valid(item.tp, item.offset),
            on_key_mismatch=self._key_mismatch,
        )

        self._rss = 0
        self._next_trim_at = 0.0
        self._process = psutil.Process()
        self._lag: dict[TopicPartition, int] = {}
        self._last_commit_at: dict[TopicPartition, float] = {}
        self._commit_lock = asyncio.Lock()
        self._stop = asyncio.Event()
        self._started = asyncio.Event()
        self._fatal: BaseException | None = None
        self._consumer: Any = None
        self._producer: Any = None
        self._paused = False
        self._paused_since = 0.0
        self._pause_logged = False
        self._aborting = False
        # Last commit seen per partition, kept across rebalances to notice a broker that lost its state.
        self._committed_before: dict[TopicPartition, int] = {}
        self._warned_key_mismatch: set[TopicPartition] = set()

    # ---- hooks -------------------------------------------------------------------------

    def _count_cache(self, redis_hits: int, batch_hits: int, misses: int) -> None:
        self.metrics.cache_hits.labels(source="redis").inc(redis_hits)
        self.metrics.cache_hits.labels(source="batch").inc(batch_hits)
        self.metrics.cache_misses.inc(misses)

    def _set_sink_state(self, healthy: bool) -> None:
        changed = healthy != self._sink_healthy
        self._sink_healthy = healthy
        if changed and self._consumer is not None:
            # Pause or resume now, not at the next fetch round (up to 100 ms later): the
            # consumer resumes the moment the store is back, and `flow` tells the truth.
            self._apply_flow()

    def _count_batch(self, batch: list[Fetched]) -> None:
        self.metrics.batch_size.observe(len(batch))
        self.stats.batches += 1
        self.stats.batch_sizes.append(len(batch))
        self.metrics.in_flight_batches.set(self.in_flight_batches)

    def _batch_done(self, batch: list[Fetched], seconds: float) -> None:
        self.metrics.batch_seconds.observe(seconds)
        self.observer.on_batch_done(len(batch))

    def _count_results(self, results: list[tuple[Fetched, Outcome]], finished_at: float) -> None:
        for item, outcome in results:
            self.stats.processed += 1
            self.stats.cached += int(outcome.result.cached)  # type: ignore[union-attr]
            self.stats.truncated += int(outcome.result.truncated)  # type: ignore[union-attr]
            latency = max(0.0, finished_at - item.timestamp)
            self.stats.latencies.append(latency)
            self.metrics.end_to_end_seconds.observe(latency)
        self.metrics.messages_processed.inc(len(results))
        deletes = sum(1 for _, o in results if o.event.is_delete)
        if deletes:
            self.metrics.documents_deleted.inc(deletes)
        self.observer.on_published([(item.tp, item.offset) for item, _ in results])

    def _admit_dead_letter(self, item: Fetched) -> bool:
        """Whether `item` may be dead-lettered; False: the breaker is open and `item` is held here."""
        if not self.live(item):
            return True  # fenced: the dead-letter path releases it, the partition's new owner decides
        was_open = self.breaker.open
        if self.breaker.admit(item.tp, item.offset):
            return True
        self._held.append(item)
        self.metrics.dead_letter_breaker_held.set(len(self._held))
        if not was_open:
            trip = self.breaker.trip
            assert trip is not None
            limit = self.breaker.limit
            tp = item.tp
            # One line, counts only (never a payload): what tripped it and what to do.
            consecutive_limit = f"limit {limit.max_consecutive}" if limit.max_consecutive else "no limit"
            ratio_limit = f"limit {limit.max_ratio:.0%} of {limit.window}" if limit.max_ratio else "no limit"
            log.error(
                "dead-letter limit reached on %s[%d] at offset %d: %d dead letters in a row (%s), %d of the "
                "last %d messages (%s); consumption paused, dead letters held uncommitted until a restart: fix the "
                "producer or the worker, then restart (held messages are replayed)",
                tp.topic, tp.partition, item.offset, trip.consecutive, consecutive_limit,
                trip.dead_letters_in_window, trip.window_messages, ratio_limit,
            )
            self.metrics.dead_letter_breaker_trips.inc()
            self.metrics.dead_letter_breaker_open.set(1)
            if self._consumer is not None:
                self._apply_flow()  # pause now, not at the next fetch round: the rest of this fetch is held anyway
        return False

    def _key_mismatch(self, item: Fetched) -> None:
        self.metrics.key_id_mismatches.inc()
        if item.tp not in self._warned_key_mismatch:
            self._warned_key_mismatch.add(item.tp)
            log.warning(
                "%s[%d] offset %d: the record's key is not its event's id; per-id order holds only when key = id "
                "(a tombstone and an upsert of one id may land on different partitions and swap); "
                "counted in embedworker_key_id_mismatches_total, logged once per partition",
                item.tp.topic, item.tp.partition, item.offset,
            )

    def _count_dead_letters(self, count: int, stage: str) -> None:
        self.stats.dead_letters += count
        self.metrics.messages_failed.inc(count)
        self.metrics.messages_dead_lettered.labels(stage=stage).inc(count)

    def _tokens(self, event: InputEvent) -> int:
        """A batching estimate: a long text being chunked costs all its chunks."""
        if event.is_delete:
            return 1
        if self.settings.long_text == LONG_TEXT_CHUNK:
            return estimate_tokens(event.text)
        return self.embedder.estimate_tokens(event.text)

    def live(self, item: Fetched) -> bool:
        """Whether `item` may still be written, published and finished: its partition's assignment is the one it came under."""
        return self._epochs.get(item.tp) == item.epoch

    # ---- public ------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Stop fetching, drain in-flight batches within the deadline, commit, close."""
        self._stop.set()

    def abort(self) -> None:
        """Stop as a crash would: no drain, no commit (what is unfinished is replayed)."""
        self._aborting = True
        self._stop.set()

    @property
    def started(self) -> asyncio.Event:
        return self._started

    def lag_records(self) -> dict[TopicPartition, int]:
        return dict(self._lag)

    def unfinished(self) -> int:
        return self.finish.buffered_messages

    def assigned(self) -> set[TopicPartition]:
        """Partitions this member owns now (not fenced)."""
        return set(self._epochs)

    @property
    def in_flight_batches(self) -> int:
        return len(self.embed_store.tasks)

    async def run(self) -> None:
        s = self.settings
        if s.memory_budget_bytes:
            tune_allocator()
        self._consumer = self.backend.consumer(s)
        self._producer = self.backend.producer(s)
        try:
            await self._producer.start()
            await self._consumer.start()
        except KafkaError as exc:
            await self._close_clients()
            raise WorkerError(f"cannot reach Kafka at {s.bootstrap_servers}: {type(exc).__name__}: {exc}") from None
        try:
            await self.pipeline.start()
            self._consumer.subscribe([s.input_topic], listener=_RebalanceListener(self))
            housekeeping = asyncio.create_task(self._housekeeping_loop(), name="housekeeping")
            self._started.set()
            try:
                await self._fetch_loop()
            finally:
                housekeeping.cancel()
                await asyncio.gather(housekeeping, return_exceptions=True)
                await self._drain()
        finally:
            await self._close_clients()
            await self.pipeline.close()
        if isinstance(self._fatal, WorkerError):
            raise self._fatal
        if isinstance(self._fatal, _PublishError):
            raise PublishError(str(self._fatal)) from None
        if self._fatal is not None:
            raise WorkerError(f"worker stopped on an unexpected error: {self._fatal!r}") from self._fatal

    # ---- fetch -------------------------------------------------------------------------

    async def _fetch_loop(self) -> None:
        consumer = self._consumer
        while not self._stop.is_set():
            self.batcher.adapt(sum(self._lag.values()))
            self.observer.on_fetch_round()
            self._apply_flow()
            self.batch.poll()
            # With every pipeline slot busy a due batch cannot start here: a finishing batch
            # starts it the moment its slot frees. Polling with a ~0 timeout meanwhile
            # spun the loop at ~1 kHz and took CPU from the model on small machines.
            due = self.batch.seconds_until_due()
            timeout = _POLL_SECONDS if due is None else min(_POLL_SECONDS, due)
            # Called while paused too: it returns nothing for paused partitions but keeps
            # the consumer inside max_poll_interval, so the group never evicts us.
            records = await consumer.getmany(
                timeout_ms=max(1, int(timeout * 1000)), max_records=self.settings.fetch_max_records
            )
            caught_up = bool(records)
            for tp, messages in records.items():
                for message in messages:
                    self._accept(tp, message)
                highwater = consumer.highwater(tp)
                if highwater is None or (messages[-1].offset + 1 < highwater and not await self._at_end(tp, highwater)):
                    caught_up = False
            if caught_up and sum(map(len, records.values())) < self.settings.fetch_max_records:
                self.batcher.close_now()
            self.batch.poll()

    async def _at_end(self, tp: TopicPartition, highwater: int) -> bool:
        """Whether the consumer's position reached `highwater` (past trailing transaction markers)."""
        try:
            return await self._consumer.position(tp) >= highwater
        except (KafkaError, AssertionError, KeyError, IllegalStateError):
            return False

    def _accept(self, tp: TopicPartition, message: Any) -> None:
        self.observer.on_consumed()
        timestamp = message.timestamp / 1000 if message.timestamp and message.timestamp > 0 else time.time()
        committed = self.tracker.committed(tp)
        if committed is not None and message.offset < committed and self.tracker.pending_count(tp) == 0:
            log.error(
                "%s[%d] restarted at offset %d below the committed offset %d: the broker lost its log; "
                "processing from there", tp.topic, tp.partition, message.offset, committed,
            )
        if committed is None:
            self.tracker.set_committed(tp, message.offset)
        if not self.tracker.register(tp, message.offset, timestamp):
            return  # already in flight here (re-fetched after a seek)
        size = len(message.value or b"") + len(message.key or b"")
        item = Fetched(tp, message.offset, timestamp, message.key, message.value, size, self._epochs.get(tp, 0))
        if message.headers:
            item.headers = tuple((k, v) for k, v in message.headers if k in self._pass_headers)
        self.finish.admit(item)
        self.stats.consumed += 1
        self.metrics.messages_consumed.inc()
        self.decode.submit(item)

    def _fail(self, exc: BaseException | None) -> None:
        if isinstance(exc, (WorkerError, _PublishError)):
            log.error("stopping: %s", exc)  # a known fault: one line, no traceback
        else:
            log.error("stopping on an unexpected error", exc_info=exc)
        self._fatal = exc
        self._stop.set()

    # ---- flow control, lag, commits ----------------------------------------------------

    def _apply_flow(self) -> None:
        if self.flow.watches_memory:
            # Sampled every round (a ~20 us syscall): one fetch can add megabytes.
            self._rss = self._process.memory_info().rss
            marks = self.flow.memory_marks
            now = time.monotonic()
            if marks is not None and self._rss >= marks.high and now >= self._next_trim_at:
                # Pages the allocator keeps after a free are no work of ours: return them
                # before judging (~ms; at most once a second).
                self._next_trim_at = now + _TRIM_INTERVAL_SECONDS
                if release_free_memory():
                    self._rss = self._process.memory_info().rss
            self.stats.max_rss_bytes = max(self.stats.max_rss_bytes, self._rss)
        waiting_batches = len(self.batcher) // max(1, self.batcher.max_messages)
        active = self.flow.update(
            FlowSignals(
                buffered_messages=self.finish.buffered_messages,
                buffered_bytes=self.finish.buffered_bytes,
                in_flight_batches=len(self.embed_store.tasks) + waiting_batches,
                rss_bytes=self._rss,
                sink_healthy=self._sink_healthy,
                dead_letter_limit=self.breaker.open,
            )
        )
        m = self.metrics
        for reason in PAUSE_REASONS:
            m.backpressure_reason.labels(reason=reason).set(1 if reason in active else 0)
        m.buffered_messages.set(self.finish.buffered_messages)
        m.buffered_bytes.set(self.finish.buffered_bytes)
        m.in_flight_batches.set(len(self.embed_store.tasks))
        assignment = self._consumer.assignment()
        now = time.monotonic()
        if active:
            if not self._paused:
                log.debug("pausing consumption: %s", ", ".join(sorted(active)))
                self.stats.pauses += 1
                for reason in active:
                    self.stats.pause_reasons[reason] = self.stats.pause_reasons.get(reason, 0) + 1
                m.pauses.inc()
                self._paused_since, self._pause_logged = now, False
            elif not self._pause_logged and now - self._paused_since >= _LOGGED_PAUSE_SECONDS:
                # Only a pause that lasts is news; brief ones are counted (metric, stats) all the same.
                log.info("consumption paused for %.1fs: %s", now - self._paused_since, ", ".join(sorted(active)))
                self._pause_logged = True
            # Re-applied every round: partitions assigned while paused start paused too.
            self._consumer.pause(*assignment)
            self._paused = True
        elif self._paused:
            if self._pause_logged:
                log.info("resuming consumption after %.1fs", now - self._paused_since)
            else:
                log.debug("resuming consumption")
            self.stats.resumes += 1
            self._consumer.resume(*assignment)
            self._paused = False
        m.backpressure_paused.set(1 if self._paused else 0)
        m.batch_target_messages.set(self.batcher.max_messages)
        m.batch_target_tokens.set(self.batcher.max_tokens)

    async def _housekeeping_loop(self) -> None:
        interval = self.settings.commit_interval_ms / 1000
        while True:
            await asyncio.sleep(interval)  # a timer, not synchronization
            self._rss = self._process.memory_info().rss
            self.stats.max_rss_bytes = max(self.stats.max_rss_bytes, self._rss)
            self.metrics.rss_bytes.set(self._rss)
            await self.commit()
            await self._update_lag(timeout=max(0.05, interval))

    async def _update_lag(self, *, timeout: float) -> None:
        """Lag from the larger of the fetch highwater and ListOffsets' log end.

        Paused partitions are not fetched, so their highwater freezes while the backlog
        grows; ListOffsets still sees it (on some brokers only as a lower bound, hence the max).
        """
        now = time.time()
        assignment = list(self._consumer.assignment())
        ends: dict[TopicPartition, int] = {}
        try:
            if assignment:
                async with asyncio.timeout(timeout):
                    ends = await self._consumer.end_offsets(assignment)
        except (KafkaError, asyncio.TimeoutError, AssertionError):
            ends = {}
        for tp in assignment:
            highwater = self._consumer.highwater(tp)
            log_end = max(highwater or 0, ends.get(tp) or 0) if (highwater is not None or tp in ends) else None
            committed = self.tracker.committed(tp)
            if log_end is None or committed is None:
                continue
            lag = max(0, log_end - committed)
            self._lag[tp] = lag
            oldest = self.tracker.oldest_pending_timestamp(tp)
            if oldest is not None:
                seconds = max(0.0, now - oldest)
            elif lag > 0:
                # Backlog not fetched yet (paused): its age is at least the time since progress.
                seconds = now - self._last_commit_at.get(tp, now)
            else:
                seconds = 0.0
            labels = {"topic": tp.topic, "partition": str(tp.partition)}
            self.metrics.consumer_lag_records.labels(**labels).set(lag)
            self.metrics.consumer_lag_seconds.labels(**labels).set(seconds)

    async def commit(self, tps: Iterable[TopicPartition] | None = None) -> None:
        """Commit the finished prefix of each (given) assigned partition."""
        async with self._commit_lock:
            assignment = self._consumer.assignment()
            wanted = [tp for tp in (assignment if tps is None else tps)]
            for tp in wanted:
                if self.tracker.pending_count(tp) == 0 and tp in assignment and tp in self._epochs:
                    try:
                        # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation.
                        async with asyncio.timeout(1.0):
                            position = await self._consumer.position(tp)
                        self.tracker.advance_idle(tp, position)
                    except (KafkaError, asyncio.TimeoutError, AssertionError, KeyError, IllegalStateError):
                        pass
            offsets = self.tracker.to_commit(wanted)
            if not offsets:
                return
            try:
                await self._consumer.commit(offsets)
            except KafkaError as exc:
                log.warning("commit failed (%s); it will be retried", type(exc).__name__)
                return
            self.tracker.mark_committed(offsets)
            self._committed_before.update(offsets)
            now = time.time()
            for tp in offsets:
                self._last_commit_at[tp] = now
            self.metrics.commits.inc()

    async def _on_assigned(self, assigned: list[TopicPartition]) -> None:
        log.info("assigned %s", ", ".join(f"{tp.topic}[{tp.partition}]" for tp in sorted(assigned)))
        for tp in assigned:
            # A new epoch per assignment: messages of an earlier ownership stay fenced.
            self._epochs[tp] = self._next_epoch
            self._next_epoch += 1
        for tp in assigned:
            try:
                committed = await asyncio.wait_for(self._consumer.committed(tp), timeout=10)
            except (KafkaError, asyncio.TimeoutError) as exc:
                log.warning("cannot read the committed offset of %s[%d] (%s)", tp.topic, tp.partition, type(exc).__name__)
                committed = None
            previous = self._committed_before.get(tp)
            if previous and (committed is None or committed < previous):
                log.error(
                    "the group's committed offset of %s[%d] went back from %d to %s: the broker lost its "
                    "state (a memory-only broker restarted?); consuming from there",
                    tp.topic, tp.partition, previous, committed,
                )
            if committed is not None:
                self.tracker.set_committed(tp, committed)
            # Without a committed offset the group starts at the log's beginning; the first
            # fetched offset stands in for it (ListOffsets is unreliable on some brokers).
            self._last_commit_at[tp] = time.time()
            self.metrics.partition_assigned.labels(topic=tp.topic, partition=str(tp.partition)).set(1)

    async def _on_revoked(self, revoked: list[TopicPartition]) -> None:
        if not revoked:
            return
        log.info("revoked %s", ", ".join(f"{tp.topic}[{tp.partition}]" for tp in sorted(revoked)))
        gone = set(revoked)
        for item in self.batch.remove(lambda item: item.tp in gone):
            self.finish.release(item)
        wait = self.settings.shutdown_timeout_seconds / 2
        deadline = time.monotonic() + wait
        # A quarter of the budget is kept for the store write already sent when the batches give up:
        # it must end before the new owner writes (the version guard covers one that still lands late).
        batches_deadline = deadline - wait / 4
        await self.embed_store.join(batches_deadline)
        await self.dead_letters.join(batches_deadline)
        try:
            async with asyncio.timeout(max(0.5, deadline - time.monotonic())):
                await self.commit(revoked)
        except asyncio.TimeoutError:
            log.warning("committing revoked partitions timed out; the next owner replays from the last commit")
        for tp in revoked:
            self._epochs.pop(tp, None)  # fenced: from here on nothing of them is written or published
        # One deadline for all of it: the handler must return within the rebalance timeout.
        if not await self.pipeline.settle(timeout=max(0.5, deadline - time.monotonic())):
            log.error(
                "a store write of revoked partitions is still running after %.1fs; if it lands after the new owner's, "
                "the version guard skips what is older (EMBEDWORKER_VERSION_GUARD)",
                wait,
            )
        self.tracker.forget(revoked)
        self.breaker.forget(revoked)
        kept = []
        for item in self._held:
            if item.tp in gone:
                self.finish.release(item)  # the partition's next owner replays it from the commit
            else:
                kept.append(item)
        self._held = kept
        self.metrics.dead_letter_breaker_held.set(len(kept))
        for tp in revoked:
            self._lag.pop(tp, None)
            labels = {"topic": tp.topic, "partition": str(tp.partition)}
            self.metrics.consumer_lag_records.labels(**labels).set(0)
            self.metrics.consumer_lag_seconds.labels(**labels).set(0)
            self.metrics.partition_assigned.labels(**labels).set(0)
        self.observer.on_revoked(revoked)

    # ---- shutdown ----------------------------------------------------------------------

    async def _drain(self) -> None:
        """Finish what was fetched, within the shutdown deadline, and commit it (bounded by it too)."""
        self.embed_store.stopping = True
        if self._aborting:
            self.embed_store.close()
            self.dead_letters.close()
            await asyncio.gather(*self.embed_store.tasks, *self.dead_letters.tasks, return_exceptions=True)
            return
        deadline = time.monotonic() + self.settings.shutdown_timeout_seconds
        if self._fatal is None:
            await self.batch.join(deadline)
        await self.embed_store.join(deadline)
        await self.dead_letters.join(deadline)
        self.embed_store.close()  # abandoned: not committed, replayed by the next owner
        self.dead_letters.close()
        await asyncio.gather(*self.embed_store.tasks, *self.dead_letters.tasks, return_exceptions=True)
        try:
            # The commit's coordinator lookup loops while the broker is away: the deadline bounds it.
            async with asyncio.timeout(max(1.0, deadline - time.monotonic())):
                await self.commit()
        except (Exception, asyncio.TimeoutError) as exc:  # the consumer may already be unusable
            log.warning("final commit failed: %s", type(exc).__name__)
        left = self.tracker.pending_count()
        if left:
            log.info("stopped with %d messages unfinished: not committed, the next owner replays them", left)

    async def _close_clients(self) -> None:
        for client in (self._consumer, self._producer):
            if client is None:
                continue
            try:
                async with asyncio.timeout(max(1.0, self.settings.shutdown_timeout_seconds / 2)):
                    await client.stop()
            except asyncio.CancelledError:
                # aiokafka's fetcher re-raises the cancellation of its own fetch task from
                # `stop()` when the broker is gone; only a cancellation of ours propagates.
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise
                log.warning("closing %s: its background task was cancelled", type(client).__name__)
            except (Exception, asyncio.TimeoutError) as exc:
                log.warning("closing %s failed: %s", type(client).__name__, type(exc).__name__)
