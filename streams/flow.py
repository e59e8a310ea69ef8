"""Backpressure: decide when to pause and resume the assigned partitions.

Each signal has a high mark that activates it and a low mark that clears it
(hysteresis), so the consumer does not flap around one threshold. The consumer is
paused while any signal is active (the role of Arroyo's `MessageRejected`).
"""

from __future__ import annotations

from dataclasses import dataclass

from streams.metrics import PAUSE_REASONS


@dataclass(frozen=True, kw_only=True)
class Watermarks:
    high: float
    low: float

    def __post_init__(self) -> None:
        if self.low > self.high:
            raise ValueError(f"low mark {self.low} is above high mark {self.high}")


@dataclass(frozen=True, kw_only=True)
class FlowSignals:
    buffered_messages: int
    buffered_bytes: int
    in_flight_batches: int
    rss_bytes: int
    sink_healthy: bool
    dead_letter_limit: bool = False
    """The dead-letter breaker is open (`streams.breaker`): paused until a restart."""


class FlowController:
    """Keyword-only settings: one `Watermarks` per signal; a 0 memory budget disables that signal."""

    def __init__(
        self,
        *,
        buffered_messages: Watermarks,
        buffered_bytes: Watermarks,
        in_flight_batches: Watermarks,
        memory_bytes: Watermarks | None,
    ) -> None:
        self._marks = {
            "buffered_messages": buffered_messages,
            "buffered_bytes": buffered_bytes,
            "in_flight_batches": in_flight_batches,
            "memory": memory_bytes,
        }
        self.active: set[str] = set()

    def set_marks(self, reason: str, marks: Watermarks) -> None:
        """Move one signal's marks (an active signal stays active until it falls to the new low mark)."""
        if reason not in self._marks or self._marks[reason] is None:
            raise KeyError(reason)
        self._marks[reason] = marks

    def marks(self, reason: str) -> Watermarks | None:
        return self._marks[reason]

    @property
    def watches_memory(self) -> bool:
        return self._marks["memory"] is not None

    @property
    def memory_marks(self) -> Watermarks | None:
        return self._marks["memory"]

    @property
    def paused(self) -> bool:
        return bool(self.active)

    def update(self, signals: FlowSignals) -> set[str]:
        values = {
            "buffered_messages": signals.buffered_messages,
            "buffered_bytes": signals.buffered_bytes,
            "in_flight_batches": signals.in_flight_batches,
            "memory": signals.rss_bytes,
        }
        for reason, marks in self._marks.items():
            if marks is None:
                continue
            value = values[reason]
            if reason == "memory" and signals.buffered_messages == 0:
                # Pausing cannot free memory that no buffered work holds (the allocator
                # keeps freed pages): holding the pause then would stall for ever.
                self.active.discard(reason)
                continue
            if reason in self.active:
                if value <= marks.low:
                    self.active.discard(reason)
            elif value >= marks.high:
                self.active.add(reason)
        if signals.sink_healthy:
            self.active.discard("sink")
        else:
            self.active.add("sink")
        if signals.dead_letter_limit:
            self.active.add("dead_letter_limit")
        else:
            self.active.discard("dead_letter_limit")
        assert self.active <= set(PAUSE_REASONS)
        return self.active
