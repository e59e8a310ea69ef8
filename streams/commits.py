"""Commits and lag: what the group is told this member has finished, and how far behind it is.

Owns: committing each partition's finished prefix (`OffsetTracker.to_commit`), noticing a
broker that lost its committed offsets, and the lag metrics (records and seconds). Must not:
finish messages (the `Finish` step does) or decide ownership (`Fencing` does; only owned
partitions are committed).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable, Iterable

from streams.backends import BrokerError, BrokerUnavailable, CommitFailed, TopicPartition

from streams.fencing import Fencing
from streams.metrics import Metrics
from streams.offsets import OffsetTracker

log = logging.getLogger("streams.runtime")

_BROKER_ERRORS = (BrokerError, asyncio.TimeoutError)


def _commit_error(exc: BrokerError) -> str:
    """The bounded label of a failed commit (`streams.metrics.COMMIT_ERRORS`)."""
    if isinstance(exc, CommitFailed):
        return "rebalance"
    if exc.kind == "UnknownTopicOrPartitionError":
        return "unknown_topic"
    if isinstance(exc, BrokerUnavailable):
        return "unavailable"
    return "other"


class Commits:
    """Keyword-only: `consumer` (a callable: the consumer exists only once the worker runs), `tracker`, `fencing`,
    `metrics`; `commit_timeout_seconds` (default 10) bounds one commit: aiokafka retries a retriable
    error (an unknown topic, a coordinator moving) without end, and the housekeeping that updates
    lag and notices a lost log waits on the commit."""

    def __init__(
        self, *, consumer: Callable[[], Any], tracker: OffsetTracker, fencing: Fencing, metrics: Metrics,
        commit_timeout_seconds: float = 10.0,
    ) -> None:
        self._consumer = consumer
        self._commit_timeout = commit_timeout_seconds
        self.tracker = tracker
        self.fencing = fencing
        self.metrics = metrics
        self.lag: dict[TopicPartition, int] = {}
        self._last_commit_at: dict[TopicPartition, float] = {}
        self._lock = asyncio.Lock()
        # Last commit seen per partition, kept across rebalances to notice a broker that lost its state.
        self._committed_before: dict[TopicPartition, int] = {}
        self._reported_behind: set[TopicPartition] = set()

    async def commit(self, tps: Iterable[TopicPartition] | None = None) -> None:
        """Commit the finished prefix of each (given) assigned partition."""
        consumer = self._consumer()
        async with self._lock:
            assignment = consumer.assignment()
            wanted = [tp for tp in (assignment if tps is None else tps)]
            for tp in wanted:
                if self.tracker.pending_count(tp) == 0 and tp in assignment and tp in self.fencing.epochs:
                    try:
                        # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation.
                        async with asyncio.timeout(1.0):
                            position = await consumer.position(tp)
                        self.tracker.advance_idle(tp, position)
                    except _BROKER_ERRORS:
                        pass
            offsets = self.tracker.to_commit(wanted)
            if not offsets:
                return
            try:
                async with asyncio.timeout(self._commit_timeout):
                    await consumer.commit(offsets)
            except TimeoutError:
                # Only this block's own deadline: a caller's deadline arrives here as a cancellation.
                self.metrics.commit_failures.labels(error="unavailable").inc()
                log.warning("a commit did not complete in %.0fs (the broker is away, or no longer knows the topic); "
                            "it will be retried", self._commit_timeout)
                return
            except BrokerError as exc:
                self.metrics.commit_failures.labels(error=_commit_error(exc)).inc()
                log.warning("commit failed (%s); it will be retried", exc.kind)
                return
            self.tracker.mark_committed(offsets)
            self._committed_before.update(offsets)
            now = time.time()
            for tp in offsets:
                self._last_commit_at[tp] = now
            self.metrics.commits.inc()

    def _check_log_behind(self, tp: TopicPartition, highwater: int | None, committed: int | None) -> None:
        """A log that ends below the group's committed offset lost records: say so once.

        Only the fetch highwater is trusted here (ListOffsets under-reports on some brokers). A
        broker that restarts empty may still take the commit aiokafka kept retrying, so the
        rejoin then reads no offset going back: this is the sign left.
        """
        if highwater is None or committed is None or highwater >= committed:
            self._reported_behind.discard(tp)
            return
        if tp in self._reported_behind:
            return
        self._reported_behind.add(tp)
        log.error(
            "the log of %s[%d] ends at %d, below the group's committed offset %d: the broker lost its state "
            "(a memory-only broker restarted, an unclean leader election, a recreated topic); consuming from its start",
            tp.topic, tp.partition, highwater, committed,
        )

    async def assigned(self, assigned: list[TopicPartition]) -> None:
        """Read the group's committed offsets of new partitions, so lag is known at once."""
        consumer = self._consumer()
        for tp in assigned:
            try:
                committed = await asyncio.wait_for(consumer.committed(tp), timeout=10)
            except (BrokerError, asyncio.TimeoutError) as exc:
                log.warning("cannot read the committed offset of %s[%d] (%s)", tp.topic, tp.partition, getattr(exc, "kind", type(exc).__name__))
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

    def forget(self, revoked: list[TopicPartition]) -> None:
        self.tracker.forget(revoked)
        for tp in revoked:
            self.lag.pop(tp, None)

    async def update_lag(self, *, timeout: float) -> None:
        """Lag from the larger of the fetch highwater and ListOffsets' log end.

        Paused partitions are not fetched, so their highwater freezes while the backlog
        grows; ListOffsets still sees it (on some brokers only as a lower bound, hence the max).
        """
        consumer = self._consumer()
        now = time.time()
        assignment = list(consumer.assignment())
        ends: dict[TopicPartition, int] = {}
        try:
            if assignment:
                async with asyncio.timeout(timeout):
                    ends = await consumer.end_offsets(assignment)
        except (BrokerError, asyncio.TimeoutError):
            ends = {}
        for tp in assignment:
            highwater = consumer.highwater(tp)
            log_end = max(highwater or 0, ends.get(tp) or 0) if (highwater is not None or tp in ends) else None
            committed = self.tracker.committed(tp)
            self._check_log_behind(tp, highwater, committed)
            if log_end is None or committed is None:
                continue
            lag = max(0, log_end - committed)
            self.lag[tp] = lag
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
