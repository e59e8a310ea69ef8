"""The gate every dead letter passes: the breaker, and the messages it holds while open.

Owns: the `DeadLetterBreaker` and the would-be dead letters held while it is open (unfinished,
so never committed past: a restart replays them), its one log line and its metrics. Must not:
publish; the `Publish` step asks `admit` before it sends a dead letter.
"""

from __future__ import annotations

import logging
from typing import Callable

from streams.backends import TopicPartition

from streams.breaker import DeadLetterBreaker, DeadLetterLimit
from streams.metrics import Metrics
from streams.steps import Fetched

log = logging.getLogger("streams.runtime")


class DeadLetterGate:
    """Keyword-only: `limit` (the breaker's), `metrics`, `live` (fencing), `on_trip` (pause the consumer now)."""

    def __init__(
        self, *, limit: DeadLetterLimit, metrics: Metrics, live: Callable[[Fetched], bool], on_trip: Callable[[], None],
    ) -> None:
        self.breaker = DeadLetterBreaker(limit=limit)
        self.metrics = metrics
        self.live = live
        self.on_trip = on_trip
        self.held: list[Fetched] = []

    @property
    def open(self) -> bool:
        return self.breaker.open

    def record_valid(self, item: Fetched) -> None:
        """Told in offset order with the dead letters: the breaker counts both in one sequence."""
        self.breaker.record_valid(item.tp, item.offset)

    def admit(self, item: Fetched) -> bool:
        """Whether `item` may be dead-lettered; False: the breaker is open and `item` is held here."""
        if not self.live(item):
            return True  # fenced: the dead-letter path releases it, the partition's new owner decides
        was_open = self.breaker.open
        if self.breaker.admit(item.tp, item.offset):
            return True
        self.held.append(item)
        self.metrics.dead_letter_breaker_held.set(len(self.held))
        if not was_open:
            self._tripped(item)
        return False

    def _tripped(self, item: Fetched) -> None:
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
        self.on_trip()  # pause now, not at the next fetch round: the rest of this fetch is held anyway

    def forget(self, revoked: list[TopicPartition]) -> list[Fetched]:
        """Drop the revoked partitions' state; returns their held messages (the next owner replays them)."""
        gone = set(revoked)
        self.breaker.forget(revoked)
        released = [item for item in self.held if item.tp in gone]
        self.held = [item for item in self.held if item.tp not in gone]
        self.metrics.dead_letter_breaker_held.set(len(self.held))
        return released
