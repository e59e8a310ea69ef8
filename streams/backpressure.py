"""Backpressure: when the consumer pauses and resumes, and what it says about it.

Owns: the `FlowController` and its watermarks, the process's RSS (sampled, with free pages
handed back before judging), pause/resume of the consumer's assignment, its log lines (only a
pause that lasts is news) and the backpressure metrics. Must not: fetch, commit or hold
messages; the worker passes in what is buffered and in flight.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import psutil

from streams.config import Settings
from streams.flow import FlowController, FlowSignals, Watermarks
from streams.allocator import release_free_memory
from streams.metrics import PAUSE_REASONS, Metrics
from streams.telemetry import RunStats

log = logging.getLogger("streams.runtime")

_TRIM_INTERVAL_SECONDS = 0.2
_LOGGED_PAUSE_SECONDS = 1.0
"""Pauses shorter than this are counted but logged at DEBUG: a fast pipeline pauses often and briefly."""
SHORTEST_PAUSE_SECONDS = 0.25
"""The in-flight band is as wide as the batches the pipeline finishes in this long (measured), so
that at full speed a pause lasts about this long instead of one batch: fewer pause/resume
flips, and each one makes aiokafka drop what it had fetched ahead for the paused partitions."""
_BATCH_GAP_WEIGHT = 0.2
"""Weight of the newest gap between finished batches in their moving average."""


class Backpressure:
    def __init__(self, settings: Settings, *, metrics: Metrics, stats: RunStats) -> None:
        depth = settings.max_in_flight_batches
        budget = settings.memory_budget_bytes
        self.flow = FlowController(
            buffered_messages=Watermarks(high=settings.buffer_max_messages, low=settings.buffer_max_messages * 0.5),
            buffered_bytes=Watermarks(high=settings.buffer_max_bytes, low=settings.buffer_max_bytes * 0.5),
            # Closed batches waiting for a pipeline slot, beyond one pipeline's depth.
            in_flight_batches=Watermarks(high=2 * depth, low=depth),
            memory_bytes=Watermarks(high=0.9 * budget, low=0.8 * budget) if budget else None,
        )
        self._depth = depth
        # The band never reads ahead past most of the message buffer: that cap pauses on its own.
        self._widest_band = max(0, int(0.8 * settings.buffer_max_messages / settings.batch_max_messages) - 2 * depth)
        self._last_batch_at: float | None = None
        self.batch_gap_seconds: float | None = None
        """Moving average of the time between finished batches (None until two have finished)."""
        self.metrics = metrics
        self.stats = stats
        self.sink_healthy = True
        self.rss = 0
        self.paused = False
        self._paused_since = 0.0
        self._pause_logged = False
        self._next_trim_at = 0.0
        self._process = psutil.Process()

    def batch_finished(self, now: float | None = None) -> None:
        """A batch left the pipeline: the rate of those sizes the in-flight band (`SHORTEST_PAUSE_SECONDS`)."""
        now = time.monotonic() if now is None else now
        if self._last_batch_at is not None:
            gap = max(now - self._last_batch_at, 1e-6)
            average = self.batch_gap_seconds
            self.batch_gap_seconds = gap if average is None else average + _BATCH_GAP_WEIGHT * (gap - average)
        self._last_batch_at = now
        extra = min(self._widest_band, int(SHORTEST_PAUSE_SECONDS / self.batch_gap_seconds)) if self.batch_gap_seconds else 0
        self.flow.set_marks("in_flight_batches", Watermarks(high=2 * self._depth + extra, low=self._depth))

    def sample_rss(self) -> int:
        self.rss = self._process.memory_info().rss
        self.stats.max_rss_bytes = max(self.stats.max_rss_bytes, self.rss)
        self.metrics.rss_bytes.set(self.rss)
        return self.rss

    def _judge_memory(self) -> None:
        # Sampled every round (a ~20 us syscall): one fetch can add megabytes.
        self.rss = self._process.memory_info().rss
        marks = self.flow.memory_marks
        now = time.monotonic()
        if marks is not None and self.rss >= marks.high and now >= self._next_trim_at:
            # Pages the allocator keeps after a free are no work of ours: return them before judging.
            self._next_trim_at = now + _TRIM_INTERVAL_SECONDS
            if release_free_memory():
                self.rss = self._process.memory_info().rss
        self.stats.max_rss_bytes = max(self.stats.max_rss_bytes, self.rss)

    def apply(
        self, consumer: Any, *, buffered_messages: int, buffered_bytes: int, in_flight_batches: int,
        waiting_batches: int, dead_letter_limit: bool,
    ) -> None:
        """Pause or resume `consumer`'s whole assignment from the current signals (called every fetch round)."""
        if self.flow.watches_memory:
            self._judge_memory()
        active = self.flow.update(
            FlowSignals(
                buffered_messages=buffered_messages,
                buffered_bytes=buffered_bytes,
                in_flight_batches=in_flight_batches + waiting_batches,
                rss_bytes=self.rss,
                sink_healthy=self.sink_healthy,
                dead_letter_limit=dead_letter_limit,
            )
        )
        m = self.metrics
        for reason in PAUSE_REASONS:
            m.backpressure_reason.labels(reason=reason).set(1 if reason in active else 0)
        m.buffered_messages.set(buffered_messages)
        m.buffered_bytes.set(buffered_bytes)
        m.in_flight_batches.set(in_flight_batches)
        assignment = consumer.assignment()
        now = time.monotonic()
        if active:
            if not self.paused:
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
            consumer.pause(*assignment)
            self.paused = True
        elif self.paused:
            if self._pause_logged:
                log.info("resuming consumption after %.1fs", now - self._paused_since)
            else:
                log.debug("resuming consumption")
            self.stats.resumes += 1
            consumer.resume(*assignment)
            self.paused = False
        m.backpressure_paused.set(1 if self.paused else 0)
