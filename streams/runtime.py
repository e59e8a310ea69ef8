"""The main runtime: fetch, rebalance, drain; its owned parts and the steps do the rest.

A message's life: fetched and registered in the `OffsetTracker`; then through the steps
(`streams/steps/`, built by `steps.chain`): `Decode` (bad input goes straight to
`DeadLetters`; a tombstone or `"op": "delete"` is a delete), `Batch`, `EmbedAndStore` (the
`Pipeline`, up to `max_in_flight_batches` batches at once, so fetching, cache lookups,
embedding and writes of different batches overlap), `Publish` (its result or dead letter is
acknowledged) and `Finish`; `Commits` commits the finished prefix of each partition. Crashes
therefore replay, never drop.

The Worker owns the consumer and producer, the fetch loop, the rebalance listener and the
drain; in the manner of aiokafka's consumer over its fetcher and coordinator, each policy is
a part with its own state: `Fencing` (whose messages are live), `Commits` (commits and lag),
`Backpressure` (pause/resume, RSS), `DeadLetterGate` (the breaker and what it holds) and
`Telemetry` (stats, observer, metrics). Must not: decode, batch, embed or publish itself.

Order: a batch takes two turns when it is launched, one for the store and one for the
result topic, so writes and results follow offset order whichever batch finishes first.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Iterable


from processors.embedder import estimate_tokens
from processors.errors import PublishError, WorkerError
from processors.pipeline import LONG_TEXT_CHUNK, Pipeline
from schemas import REPLAY_COUNT_HEADER, InputEvent, copied_headers, headers_size, passed_header_names
from streams.backends import Backend, BrokerError, TopicPartition
from streams.backends.kafka import REBALANCE_TIMEOUT_MS, KafkaBackend
from streams.backpressure import Backpressure
from streams.breaker import DeadLetterLimit
from streams.commits import Commits
from streams.config import ConfigError, Settings
from streams.dead_letter_gate import DeadLetterGate
from streams.fencing import Fencing
from streams.allocator import tune_allocator
from streams.collector import steady_collector
from streams.metrics import Metrics
from streams.offsets import OffsetTracker
from streams.steps import Fetched
from streams.steps.chain import ChainHooks, build_chain
from streams.telemetry import RunStats, Telemetry, WorkerObserver
from streams.tracing import Tracing

log = logging.getLogger(__name__)

_POLL_SECONDS = 0.1

__all__ = ["Fetched", "PublishError", "RunStats", "Worker", "WorkerError", "WorkerObserver"]


class _RebalanceListener:
    """What must be committed on a rebalance.

    Revoked: every finished message of the revoked partitions is committed before they
    go, after giving in-flight batches until three quarters of `shutdown_timeout_seconds / 2`
    to finish, so the next owner neither loses nor needlessly repeats work. Then the
    partitions are fenced: no batch writes, publishes or finishes their messages any more,
    and a store write already sent is waited for with the rest of the budget; one that lands
    later still cannot go back in time (the store's version guard). Buffered messages not yet
    in a batch are dropped: the next owner replays them from the committed offset, as it
    replays the fenced ones.
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
        self.metrics = metrics or Metrics()
        self.tracing = Tracing(enabled=settings.tracing)
        self.telemetry = Telemetry(metrics=self.metrics, observer=observer or WorkerObserver(), tracing=self.tracing,
                                   tenants_top=settings.tenant_metrics_top, tokens=self._tokens)
        self.stats, self.observer = self.telemetry.stats, self.telemetry.observer
        self.pipeline = pipeline
        self.embedder = pipeline.embedder
        # The worker's telemetry rides on the pipeline it is given (built by `streams.assembly`).
        pipeline.hooks = self.telemetry.pipeline_hooks(on_sink_state=self._set_sink_state)

        self.fencing = Fencing()
        self.tracker = OffsetTracker()
        self.commits = Commits(consumer=lambda: self._consumer, tracker=self.tracker, fencing=self.fencing, metrics=self.metrics)
        self.backpressure = Backpressure(settings, metrics=self.metrics, stats=self.stats)
        self.gate = DeadLetterGate(
            limit=DeadLetterLimit(
                max_ratio=settings.dlq_max_ratio, window=settings.dlq_window, max_consecutive=settings.dlq_max_consecutive,
            ),
            metrics=self.metrics, live=self.live, on_trip=self._apply_flow,
        )
        # A version read from a header is held with the message like the headers that travel.
        version_headers = ",".join(p[7:] for p in settings.version_from.split("|") if p.startswith("header:"))
        tenant_header = settings.tenant_from[7:] if settings.tenant_from.startswith("header:") else ""
        self._pass_headers = passed_header_names(f"{settings.pass_headers},{version_headers},{tenant_header}", REPLAY_COUNT_HEADER)
        t = self.telemetry
        chain = build_chain(
            settings, pipeline=pipeline, tracker=self.tracker, producer=lambda: self._producer, tracing=self.tracing,
            hooks=ChainHooks(
                live=self.live, admit_dead_letter=self.gate.admit, on_valid=self.gate.record_valid,
                on_key_mismatch=t.key_mismatch, on_batch=t.batch_launched, on_batch_done=self._batch_done,
                on_results=t.results, on_dead_letters=t.dead_letters,
                on_publish_error=lambda kind, error: self.metrics.publish_errors.labels(kind=kind, error=error).inc(),
                on_error=self._fail, tokens=self._tokens,
            ),
        )
        self.decode, self.batch, self.embed_store = chain.decode, chain.batch, chain.embed_store
        self.publish, self.dead_letters, self.finish = chain.publish, chain.dead_letters, chain.finish
        self.publisher, self.batcher = chain.publisher, chain.batcher

        self._stop = asyncio.Event()
        self._started = asyncio.Event()
        self._fatal: BaseException | None = None
        self._consumer: Any = None
        self._producer: Any = None
        self._aborting = False

    # ---- what the parts ask of the worker --------------------------------------------------

    def _set_sink_state(self, healthy: bool) -> None:
        changed = healthy != self.backpressure.sink_healthy
        self.backpressure.sink_healthy = healthy
        if changed:
            # Pause or resume now, not at the next fetch round (up to 100 ms later): the
            # consumer resumes the moment the store is back, and `flow` tells the truth.
            self._apply_flow()

    def _batch_done(self, batch: list[Fetched], seconds: float) -> None:
        self.telemetry.batch_done(batch, seconds)
        self.backpressure.batch_finished()

    def _apply_flow(self) -> None:
        if self._consumer is None:
            return
        self.backpressure.apply(
            self._consumer,
            buffered_messages=self.finish.buffered_messages,
            buffered_bytes=self.finish.buffered_bytes,
            in_flight_batches=len(self.embed_store.tasks),
            # Fair batching can only let a tenant's events overtake what is read: with it the buffer's
            # caps bound the read-ahead, not the closed batches waiting for a slot.
            waiting_batches=0 if self.batcher.tenant_of is not None else len(self.batcher) // max(1, self.batcher.max_messages),
            dead_letter_limit=self.gate.open,
        )
        self.metrics.batch_target_messages.set(self.batcher.max_messages)
        self.metrics.batch_target_tokens.set(self.batcher.max_tokens)

    def _tokens(self, event: InputEvent) -> int:
        """A batching estimate: a long text being chunked costs all its chunks."""
        if event.is_delete:
            return 1
        if self.settings.long_text == LONG_TEXT_CHUNK:
            return estimate_tokens(event.text)
        return self.embedder.estimate_tokens(event.text)

    def live(self, item: Fetched) -> bool:
        """Whether `item` may still be written, published and finished (see `Fencing`)."""
        return self.fencing.live(item)

    @property
    def flow(self) -> Any:
        """The `FlowController` (its `paused` and `active` reasons)."""
        return self.backpressure.flow

    @property
    def breaker(self) -> Any:
        return self.gate.breaker

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
        return dict(self.commits.lag)

    def unfinished(self) -> int:
        return self.finish.buffered_messages

    def assigned(self) -> set[TopicPartition]:
        """Partitions this member owns now (not fenced)."""
        return self.fencing.owned()

    @property
    def in_flight_batches(self) -> int:
        return len(self.embed_store.tasks)

    async def commit(self, tps: Iterable[TopicPartition] | None = None) -> None:
        """Commit the finished prefix of each (given) assigned partition."""
        await self.commits.commit(tps)

    async def run(self) -> None:
        s = self.settings
        if s.memory_budget_bytes:
            tune_allocator()
        self._consumer = self.backend.consumer(s)
        self._producer = self.backend.producer(s)
        try:
            await self._producer.start()
            await self._consumer.start()
        except BrokerError as exc:
            await self._close_clients()
            raise WorkerError(f"cannot reach Kafka at {s.bootstrap_servers}: {exc.kind}: {exc}") from None
        try:
            await self.pipeline.start()
            self._consumer.subscribe([s.input_topic], listener=_RebalanceListener(self))
            housekeeping = asyncio.create_task(self._housekeeping_loop(), name="housekeeping")
            self._started.set()
            try:
                with steady_collector(s.gc_young_threshold):
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

    # ---- fetch -------------------------------------------------------------------------

    async def _fetch_loop(self) -> None:
        consumer = self._consumer
        while not self._stop.is_set():
            self.batcher.adapt(sum(self.commits.lag.values()))
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
                self.observer.on_consumed()
                self.telemetry.consumed(sum(self._accept(tp, message) for message in messages))
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
        except BrokerError:
            return False

    def _accept(self, tp: TopicPartition, message: Any) -> bool:
        """Register and hand on one fetched message; False for one already in flight (re-fetched after a seek)."""
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
            return False
        headers: tuple[tuple[str, bytes], ...] = ()
        if message.headers:
            headers, dropped = copied_headers(message.headers, self._pass_headers, replay_header=REPLAY_COUNT_HEADER)
            if dropped:
                self.metrics.headers_dropped.inc(dropped)
        # What is held until the message is finished: backpressure counts all of it.
        size = len(message.value or b"") + len(message.key or b"") + headers_size(headers)
        item = Fetched(tp, message.offset, timestamp, message.key, message.value, size, self.fencing.epoch(tp), headers=headers)
        self.finish.admit(item)
        self.decode.submit(item)
        return True

    def _fail(self, exc: BaseException | None) -> None:
        if isinstance(exc, WorkerError):
            log.error("stopping: %s", exc)  # a known fault: one line, no traceback
        else:
            log.error("stopping on an unexpected error", exc_info=exc)
        self._fatal = exc
        self._stop.set()

    async def _housekeeping_loop(self) -> None:
        interval = self.settings.commit_interval_ms / 1000
        while True:
            await asyncio.sleep(interval)  # a timer, not synchronization
            self.backpressure.sample_rss()
            await self.commits.commit()
            await self.commits.update_lag(timeout=max(0.05, interval))

    # ---- rebalances --------------------------------------------------------------------

    async def _on_assigned(self, assigned: list[TopicPartition]) -> None:
        log.info("assigned %s", ", ".join(f"{tp.topic}[{tp.partition}]" for tp in sorted(assigned)))
        self.fencing.assign(assigned)
        await self.commits.assigned(assigned)

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
                await self.commits.commit(revoked)
        except asyncio.TimeoutError:
            log.warning("committing revoked partitions timed out; the next owner replays from the last commit")
        self.fencing.fence(revoked)  # from here on nothing of them is written or published
        # One deadline for all of it: the handler must return within the rebalance timeout.
        if not await self.pipeline.settle(timeout=max(0.5, deadline - time.monotonic())):
            log.error(
                "a store write of revoked partitions is still running after %.1fs; if it lands after the new owner's, "
                "the version guard skips what is older (EMBEDWORKER_VERSION_GUARD)",
                wait,
            )
        self.commits.forget(revoked)
        for item in self.gate.forget(revoked):
            self.finish.release(item)  # the partition's next owner replays it from the commit
        for tp in revoked:
            self.telemetry.partition_released(tp)
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
                await self.commits.commit()
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
