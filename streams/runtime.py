"""The main runtime: fetch, decode, micro-batch, process, publish, commit.

A message's life: fetched and registered in the `OffsetTracker`; decoded (bad input
goes straight to the dead-letter topic; a tombstone or `"op": "delete"` is a delete);
added to the `Batcher`; processed by the `Pipeline` in a batch task (up to
`max_in_flight_batches` at once, so fetching, cache lookups, embedding and writes of
different batches overlap); its result or dead letter is published and acknowledged; only
then is it finished in the tracker, and the commit loop commits the finished prefix of
each partition. Crashes therefore replay, never drop.

Order: a batch takes two turns when it is launched, one for the store and one for the
result topic, so writes and results follow offset order whichever batch finishes first.
Fencing: every message carries the epoch of its partition's assignment; once a partition
is revoked, its messages are neither written, nor published, nor finished here.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import psutil
from aiokafka import ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import IllegalStateError, KafkaError

from processors.cache import VectorCache
from processors.embedder import Embedder
from processors.backoff import Backoff
from processors.embedder import estimate_tokens
from processors.ordering import Sequencer, Turn
from processors.pipeline import LONG_TEXT_CHUNK, Outcome, Pipeline, PipelineHooks
from processors.sink import VectorSink
from schemas import InputEvent, InvalidEvent, Limits, SourcePosition, decode_input, encode_dead_letter
from streams.batching import BatchPolicy, Batcher
from streams.config import Settings
from streams.flow import FlowController, FlowSignals, Watermarks
from streams.backends import Backend
from streams.backends.kafka import KafkaBackend
from streams.memory import release_free_memory, tune_allocator
from streams.metrics import Metrics
from streams.offsets import OffsetTracker

log = logging.getLogger(__name__)

_POLL_SECONDS = 0.1
_TRIM_INTERVAL_SECONDS = 1.0


@dataclass(slots=True)
class Fetched:
    tp: TopicPartition
    offset: int
    timestamp: float
    key: bytes | None
    value: bytes | None
    size: int
    epoch: int = 0
    """The assignment of its partition it was fetched under (see `Worker._live`)."""
    event: InputEvent | None = None


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


class PublishError(WorkerError):
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

    Keyword-only: `embedder`, `sink`, `cache` (None: no cache), `metrics` (default: a
    fresh registry), `observer` (measurement hooks), `backend` (default: aiokafka;
    `streams.backends.memory.MemoryBroker` in unit tests). `settings` carries everything
    else (see `streams.config.OPTIONS`).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        embedder: Embedder,
        sink: VectorSink,
        cache: VectorCache | None = None,
        metrics: Metrics | None = None,
        observer: WorkerObserver | None = None,
        backend: Backend | None = None,
    ) -> None:
        self.settings = settings
        self.backend: Backend = backend or KafkaBackend()
        self.observer = observer or WorkerObserver()
        self.metrics = metrics or Metrics()
        self.stats = RunStats()
        self.embedder = embedder
        m = self.metrics
        self._sink_healthy = True
        hooks = PipelineHooks(
            on_cache=self._count_cache,
            on_embed=lambda texts, seconds: (m.texts_embedded.inc(texts), m.embed_seconds.observe(seconds)),
            on_upsert=lambda points, seconds: (m.chunks_written.inc(points), m.upsert_seconds.observe(seconds)),
            on_sink_error=m.sink_errors.inc,
            on_sink_state=self._set_sink_state,
        )
        self.pipeline = Pipeline(
            embedder=embedder, sink=sink, cache=cache, store_text=settings.store_text, hooks=hooks,
            long_text=settings.long_text, chunk_overlap_tokens=settings.chunk_overlap_tokens,
        )
        self._publish_order = Sequencer()
        self._epochs: dict[TopicPartition, int] = {}
        self._next_epoch = 1
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
        self._batch_tasks: set[asyncio.Task[None]] = set()
        self._side_tasks: set[asyncio.Task[None]] = set()
        self._buffered_messages = 0
        self._buffered_bytes = 0
        self._rss = 0
        self._next_trim_at = 0.0
        self._process = psutil.Process()
        self._send_backoff = Backoff(base_seconds=0.2, cap_seconds=5.0)
        self._lag: dict[TopicPartition, int] = {}
        self._last_commit_at: dict[TopicPartition, float] = {}
        self._commit_lock = asyncio.Lock()
        self._stop = asyncio.Event()
        self._started = asyncio.Event()
        self._fatal: BaseException | None = None
        self._consumer: Any = None
        self._producer: Any = None
        self._paused = False
        self._aborting = False
        # Last commit seen per partition, kept across rebalances to notice a broker that lost its state.
        self._committed_before: dict[TopicPartition, int] = {}

    # ---- hooks -------------------------------------------------------------------------

    def _count_cache(self, redis_hits: int, batch_hits: int, misses: int) -> None:
        self.metrics.cache_hits.labels(source="redis").inc(redis_hits)
        self.metrics.cache_hits.labels(source="batch").inc(batch_hits)
        self.metrics.cache_misses.inc(misses)

    def _set_sink_state(self, healthy: bool) -> None:
        self._sink_healthy = healthy

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
        return self._buffered_messages

    def assigned(self) -> set[TopicPartition]:
        """Partitions this member owns now (not fenced)."""
        return set(self._epochs)

    @property
    def in_flight_batches(self) -> int:
        return len(self._batch_tasks)

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
        if self._fatal is not None:
            raise WorkerError(f"worker stopped on an unexpected error: {self._fatal!r}") from self._fatal

    # ---- fetch and batch ---------------------------------------------------------------

    async def _fetch_loop(self) -> None:
        consumer = self._consumer
        while not self._stop.is_set():
            now = time.monotonic()
            self.batcher.adapt(sum(self._lag.values()))
            self.observer.on_fetch_round()
            self._apply_flow()
            self._launch_ready(now)
            # With every pipeline slot busy a due batch cannot start here: `_batch_done`
            # starts it the moment a slot frees. Polling with a ~0 timeout meanwhile
            # spun the loop at ~1 kHz and took CPU from the model on small machines.
            slot_free = len(self._batch_tasks) < self.settings.max_in_flight_batches
            due = self.batcher.seconds_until_due(now) if slot_free else None
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
            self._launch_ready(time.monotonic())

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
        item = Fetched(tp, message.offset, timestamp, message.key, message.value, size)
        self._buffered_messages += 1
        self._buffered_bytes += size
        self.stats.consumed += 1
        self.metrics.messages_consumed.inc()
        item.epoch = self._epochs.get(tp, 0)
        try:
            item.event = decode_input(message.value, self.limits, key=message.key)
        except InvalidEvent as exc:
            self._spawn_side(self._dead_letter([(item, exc.kind, exc.message)], stage="decode"))
            return
        self.batcher.add(item, self._tokens(item.event), time.monotonic())

    def _tokens(self, event: InputEvent) -> int:
        """A batching estimate: a long text being chunked costs all its chunks."""
        if event.is_delete:
            return 1
        if self.settings.long_text == LONG_TEXT_CHUNK:
            return estimate_tokens(event.text)
        return self.embedder.estimate_tokens(event.text)

    def _live(self, item: Fetched) -> bool:
        """Whether `item` may still be written, published and finished: its partition's assignment is the one it came under."""
        return self._epochs.get(item.tp) == item.epoch

    def _launch_ready(self, now: float, *, drain: bool = False) -> None:
        """Start due batches (every buffered one when draining) while pipeline slots are free."""
        while len(self._batch_tasks) < self.settings.max_in_flight_batches and (
            len(self.batcher) if drain else self.batcher.ready(now)
        ):
            batch = self.batcher.take(now)
            # Both turns are taken here, before the task's first await: launch order is offset order.
            write_turn, publish_turn = self.pipeline.take_turn(), self._publish_order.take()
            task = asyncio.create_task(self._run_batch(batch, write_turn, publish_turn))
            self._batch_tasks.add(task)
            # A task cancelled before it ever ran skips its `finally`: end its turns here too.
            task.add_done_callback(lambda _, w=write_turn, p=publish_turn: (w.end(), p.end()))
            task.add_done_callback(self._batch_done)
        self.metrics.in_flight_batches.set(len(self._batch_tasks))

    def _batch_done(self, task: asyncio.Task[None]) -> None:
        self._batch_tasks.discard(task)
        self.metrics.in_flight_batches.set(len(self._batch_tasks))
        if not task.cancelled() and task.exception() is not None:
            self._fail(task.exception())
        elif not self._stop.is_set():
            self._launch_ready(time.monotonic())  # the freed slot takes the next due batch now

    def _spawn_side(self, coroutine: Any) -> None:
        task = asyncio.create_task(coroutine)
        self._side_tasks.add(task)

        def done(finished: asyncio.Task[None]) -> None:
            self._side_tasks.discard(finished)
            if not finished.cancelled() and finished.exception() is not None:
                self._fail(finished.exception())

        task.add_done_callback(done)

    def _fail(self, exc: BaseException | None) -> None:
        if isinstance(exc, WorkerError):
            log.error("stopping: %s", exc)  # a known fault: one line, no traceback
        else:
            log.error("stopping on an unexpected error", exc_info=exc)
        self._fatal = exc
        self._stop.set()

    # ---- processing --------------------------------------------------------------------

    async def _run_batch(self, batch: list[Fetched], write_turn: Turn, publish_turn: Turn) -> None:
        started = time.monotonic()
        batch_id = uuid.uuid4().hex[:12]
        ids = {"batch_id": batch_id}
        if log.isEnabledFor(logging.DEBUG):
            log.debug("batch of %d messages: %s", len(batch), _positions(batch), extra=ids)
        self.metrics.batch_size.observe(len(batch))
        self.stats.batches += 1
        self.stats.batch_sizes.append(len(batch))
        try:
            outcomes: list[Outcome] = await self.pipeline.process(
                [item.event for item in batch],  # type: ignore[misc]
                turn=write_turn,
                live=lambda index: self._live(batch[index]),
            )
        finally:
            write_turn.end()
        async with publish_turn:
            await self._publish_outcomes(batch, outcomes, batch_id)
        seconds = time.monotonic() - started
        self.metrics.batch_seconds.observe(seconds)
        self.observer.on_batch_done(len(batch))

    async def _publish_outcomes(self, batch: list[Fetched], outcomes: list[Outcome], batch_id: str) -> None:
        """Results and dead letters of a batch's live messages, in the batch's publishing turn."""
        fenced = [item for item in batch if not self._live(item)]
        for item in fenced:
            self._release(item)  # the partition's new owner replays it
        pairs = [(item, o) for item, o in zip(batch, outcomes) if self._live(item)]
        results = [(item, o) for item, o in pairs if o.result is not None]
        failures = [(item, o.error_kind or "error", o.error_message or "") for item, o in pairs if o.result is None]
        if results:
            await self._send_reliably(
                [(self.settings.output_topic, o.event.id.encode("utf-8"), o.result.encode(), None) for _, o in results],  # type: ignore[union-attr]
                batch_id=batch_id,
            )
            finished_at = time.time()
            for item, outcome in results:
                self._finish(item)
                self.stats.processed += 1
                self.stats.cached += int(outcome.result.cached)  # type: ignore[union-attr]
                self.stats.truncated += int(outcome.result.truncated)  # type: ignore[union-attr]
                latency = max(0.0, finished_at - item.timestamp)
                self.stats.latencies.append(latency)
                self.metrics.end_to_end_seconds.observe(latency)
            self.metrics.messages_processed.inc(len(results))
            self.observer.on_published([(item.tp, item.offset) for item, _ in results])
            deletes = sum(1 for _, o in results if o.event.is_delete)
            if deletes:
                self.metrics.documents_deleted.inc(deletes)
        if failures:
            await self._dead_letter(failures, stage="embed", batch_id=batch_id)
        log.debug("batch done: %d results, %d dead letters, %d fenced", len(results), len(failures), len(fenced),
                  extra={"batch_id": batch_id})

    async def _dead_letter(self, failures: list[tuple[Fetched, str, str]], *, stage: str, batch_id: str | None = None) -> None:
        messages = []
        cap = self.settings.dlq_max_payload_bytes
        for item, kind, message in failures:
            source = SourcePosition(topic=item.tp.topic, partition=item.tp.partition, offset=item.offset)
            extra: dict[str, str] = {"message_id": _message_id(item)}
            if batch_id is not None:
                extra["batch_id"] = batch_id
            event_id = f" (event id {item.event.id!r})" if item.event is not None else ""
            log.warning("dead letter at %s%s: %s: %s", stage, event_id, kind, message[:200], extra=extra)
            value = encode_dead_letter(kind=kind, message=message, source=source, payload=item.value, max_payload_bytes=cap)
            # What goes out if the broker refuses that (too large for it): the envelope alone.
            bare = encode_dead_letter(kind=kind, message=message[:1000], source=source, payload=item.value, max_payload_bytes=0)
            messages.append((self.settings.dlq_topic, item.key if item.key is None or len(item.key) <= 4096 else None, value, bare))
        await self._send_reliably(messages, batch_id=batch_id)
        for item, kind, _ in failures:
            self._finish(item)
        self.stats.dead_letters += len(failures)
        self.metrics.messages_failed.inc(len(failures))
        self.metrics.messages_dead_lettered.labels(stage=stage).inc(len(failures))

    async def _send_reliably(
        self, messages: list[tuple[str, bytes | None, bytes, bytes | None]], *, batch_id: str | None = None
    ) -> None:
        """Publish and wait for every acknowledgement, retrying retriable failures with backoff.

        Retriable errors are retried without end: a message whose result cannot be published
        must not be committed, and the growing backlog pauses the consumer meanwhile. A record
        the broker can never take (too large, invalid) is sent in its fallback form (a dead
        letter without its payload); one without a fallback stops the worker with one line.
        """
        remaining, attempt = messages, 0
        while remaining:
            acks: list[Any] = []
            for topic, key, value, _ in remaining:
                try:
                    acks.append(await self._producer.send(topic, value=value, key=key))
                except KafkaError as exc:
                    acks.append(_failed(exc))
            outcomes = await asyncio.gather(*acks, return_exceptions=True)
            retry: list[tuple[str, bytes | None, bytes, bytes | None]] = []
            retriable: BaseException | None = None
            for message, outcome in zip(remaining, outcomes):
                if not isinstance(outcome, BaseException):
                    continue
                kind = "dead_letter" if message[0] == self.settings.dlq_topic else "result"
                self.metrics.publish_errors.labels(kind=kind, error=_error_label(outcome)).inc()
                if getattr(outcome, "retriable", True) and not isinstance(outcome, (ValueError, TypeError)):
                    retriable = outcome
                    retry.append(message)
                elif message[3] is not None:
                    log.error(
                        "the broker refused a %d-byte dead letter for %s (%s); sending it without its payload",
                        len(message[2]), message[0], type(outcome).__name__,
                    )
                    retry.append((message[0], message[1], message[3], None))
                else:
                    raise PublishError(
                        f"the broker refused a {len(message[2])}-byte record for {message[0]} "
                        f"({type(outcome).__name__}: {outcome}); it cannot be retried, stopping"
                    )
            if retriable is not None:
                delay = self._send_backoff.delay(attempt)
                log.warning(
                    "publishing %d events failed (%s); retry in %.2fs", len(retry), type(retriable).__name__, delay,
                    extra={"batch_id": batch_id} if batch_id is not None else None,
                )
                attempt += 1
                await asyncio.sleep(delay)
            remaining = retry

    def _release(self, item: Fetched) -> None:
        """Stop counting a message as buffered without finishing it (fenced: its partition moved on)."""
        self._buffered_messages -= 1
        self._buffered_bytes -= item.size

    def _finish(self, item: Fetched) -> None:
        self.tracker.finish(item.tp, item.offset)
        self._release(item)

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
                buffered_messages=self._buffered_messages,
                buffered_bytes=self._buffered_bytes,
                in_flight_batches=len(self._batch_tasks) + waiting_batches,
                rss_bytes=self._rss,
                sink_healthy=self._sink_healthy,
            )
        )
        m = self.metrics
        for reason in ("buffered_messages", "buffered_bytes", "in_flight_batches", "memory", "sink"):
            m.backpressure_reason.labels(reason=reason).set(1 if reason in active else 0)
        m.buffered_messages.set(self._buffered_messages)
        m.buffered_bytes.set(self._buffered_bytes)
        assignment = self._consumer.assignment()
        if active:
            if not self._paused:
                log.info("pausing consumption: %s", ", ".join(sorted(active)))
                self.stats.pauses += 1
                for reason in active:
                    self.stats.pause_reasons[reason] = self.stats.pause_reasons.get(reason, 0) + 1
                m.pauses.inc()
            # Re-applied every round: partitions assigned while paused start paused too.
            self._consumer.pause(*assignment)
            self._paused = True
        elif self._paused:
            log.info("resuming consumption")
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
        for item in self.batcher.remove(lambda item: item.tp in gone):
            self._buffered_messages -= 1
            self._buffered_bytes -= item.size
        wait = self.settings.shutdown_timeout_seconds / 2
        pending = self._batch_tasks | self._side_tasks
        if pending:
            await asyncio.wait(pending, timeout=wait)
        await self.commit(revoked)
        for tp in revoked:
            self._epochs.pop(tp, None)  # fenced: from here on nothing of them is written or published
        if not await self.pipeline.settle(timeout=wait):
            log.error(
                "a store write of revoked partitions is still running after %.1fs; it may land after the new owner's",
                wait,
            )
        self.tracker.forget(revoked)
        for tp in revoked:
            self._lag.pop(tp, None)
            labels = {"topic": tp.topic, "partition": str(tp.partition)}
            self.metrics.consumer_lag_records.labels(**labels).set(0)
            self.metrics.consumer_lag_seconds.labels(**labels).set(0)
            self.metrics.partition_assigned.labels(**labels).set(0)
        self.observer.on_revoked(revoked)

    # ---- shutdown ----------------------------------------------------------------------

    async def _drain(self) -> None:
        """Finish what was fetched, within the shutdown deadline, and commit it."""
        if self._aborting:
            for task in self._batch_tasks | self._side_tasks:
                task.cancel()
            await asyncio.gather(*self._batch_tasks, *self._side_tasks, return_exceptions=True)
            return
        deadline = time.monotonic() + self.settings.shutdown_timeout_seconds
        if self._fatal is None:
            while len(self.batcher) and time.monotonic() < deadline:
                self._launch_ready(time.monotonic(), drain=True)
                if self._batch_tasks:
                    await asyncio.wait(self._batch_tasks, timeout=max(0.0, deadline - time.monotonic()), return_when=asyncio.FIRST_COMPLETED)
        pending = self._batch_tasks | self._side_tasks
        if pending:
            await asyncio.wait(pending, timeout=max(0.0, deadline - time.monotonic()))
        for task in self._batch_tasks | self._side_tasks:
            task.cancel()  # abandoned: not committed, replayed by the next owner
        try:
            await self.commit()
        except Exception as exc:  # the consumer may already be unusable
            log.warning("final commit failed: %s", type(exc).__name__)

    async def _close_clients(self) -> None:
        for client in (self._consumer, self._producer):
            if client is None:
                continue
            try:
                await client.stop()
            except Exception as exc:
                log.warning("closing %s failed: %s", type(client).__name__, type(exc).__name__)


async def _failed(exc: BaseException) -> None:
    raise exc


def _error_label(exc: BaseException) -> str:
    """A bounded label value: aiokafka's error class names are a fixed set; anything else is `other`."""
    name = type(exc).__name__
    return name if type(exc).__module__.startswith("aiokafka") or name in ("TimeoutError", "CancelledError") else "other"


def _message_id(item: Fetched) -> str:
    """Where a message came from, as `topic/partition/offset` (unique and replay-stable)."""
    return f"{item.tp.topic}/{item.tp.partition}/{item.offset}"


def _positions(batch: list[Fetched]) -> str:
    """`topic[partition]@first-last` per partition of a batch, for its debug line."""
    spans: dict[tuple[str, int], list[int]] = {}
    for item in batch:
        span = spans.setdefault((item.tp.topic, item.tp.partition), [item.offset, item.offset])
        span[0], span[1] = min(span[0], item.offset), max(span[1], item.offset)
    return ", ".join(f"{topic}[{partition}]@{first}-{last}" for (topic, partition), (first, last) in sorted(spans.items()))
