"""The dead-letter breaker: stop dead-lettering when most of a partition is going there.

In the manner of Sentry Arroyo's `DlqLimit` (`max_invalid_ratio`, `max_consecutive_count`,
counted per partition): a broken upstream deploy (or a broken worker) makes every message
"bad", and dead-lettering a whole topic is worse than stopping, since the dead letters
then have to be sorted out and replayed by hand. Past the limit the breaker is open: the
worker holds every further would-be dead letter (neither published nor finished, so never
committed past), pauses consumption and reports it (log line, metrics, alert).

It stays open until the worker restarts. A timer that half-opens would not help: the
held messages are already in the log and fail the same way on every try, so a retry
could only trip again or dead-letter them after all. After a restart the window starts
empty, so a topic that is still bad trips again within the limit.

Owns: the counting (no I/O, no clock). Must not: publish, pause or commit (the `Worker`
does, on what `admit` answers).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Hashable, Iterable


@dataclass(frozen=True, kw_only=True)
class DeadLetterLimit:
    """`max_ratio`: share of a partition's last `window` messages (0: off), judged once the
    window is full; `max_consecutive`: dead letters in a row on a partition (0: off).
    A message over either limit is refused: the limit is the most that may go out."""

    max_ratio: float
    window: int
    max_consecutive: int

    def __post_init__(self) -> None:
        if not 0 <= self.max_ratio <= 1:
            raise ValueError(f"max_ratio {self.max_ratio} is not between 0 and 1")
        if self.window <= 0:
            raise ValueError(f"window {self.window} must be positive")
        if self.max_consecutive < 0:
            raise ValueError(f"max_consecutive {self.max_consecutive} is negative")

    @property
    def enabled(self) -> bool:
        return self.max_ratio > 0 or self.max_consecutive > 0


@dataclass(frozen=True, slots=True, kw_only=True)
class Trip:
    """Why the breaker opened: counts only (never a payload), for the log line."""

    partition: Hashable
    dead_letters_in_window: int
    window_messages: int
    consecutive: int
    reason: str
    """`ratio` or `consecutive`."""


@dataclass(slots=True)
class _Partition:
    outcomes: deque[list[Any]] = field(default_factory=deque)
    """[dead letter?, offset] per message, oldest first (at most `window`)."""
    valid_at: dict[int, list[Any]] = field(default_factory=dict)
    """The entries counted valid, by offset: a later failure of one (the model's) turns it into a dead letter."""
    dead_letters: int = 0
    consecutive: int = 0


class DeadLetterBreaker:
    """Counts each partition's valid messages and dead letters in offset order.

    `record_valid` for a message that decoded; `admit` for one about to be dead-lettered:
    True lets it go out, False means the breaker is (now) open and the caller must hold it.
    """

    def __init__(self, *, limit: DeadLetterLimit) -> None:
        self.limit = limit
        self.trip: Trip | None = None
        self._partitions: dict[Hashable, _Partition] = {}

    @property
    def open(self) -> bool:
        return self.trip is not None

    def record_valid(self, partition: Hashable, offset: int | None = None) -> None:
        if not self.limit.enabled:
            return
        part = self._partitions.get(partition)
        if part is None:
            part = self._partitions[partition] = _Partition()
        self._push(part, False, offset)
        part.consecutive = 0

    def admit(self, partition: Hashable, offset: int | None = None) -> bool:
        """Count a would-be dead letter; False once open (this one tripped it, or an earlier one).

        A message counted valid when it decoded (`record_valid` with its offset) and failing
        later (the model refused it) is counted again in its own place, not as one more message.
        """
        if self.trip is not None:
            return False
        if not self.limit.enabled:
            return True
        part = self._partitions.get(partition)
        if part is None:
            part = self._partitions[partition] = _Partition()
        entry = part.valid_at.pop(offset, None) if offset is not None else None
        if entry is not None:
            entry[0] = True
            part.dead_letters += 1
            part.consecutive = self._trailing_dead_letters(part)
        else:
            self._push(part, True, offset)
            part.consecutive += 1
        limit = self.limit
        reason = None
        if limit.max_consecutive and part.consecutive > limit.max_consecutive:
            reason = "consecutive"
        elif (
            limit.max_ratio
            and len(part.outcomes) >= limit.window
            and part.dead_letters > limit.max_ratio * limit.window
        ):
            reason = "ratio"
        if reason is None:
            return True
        self.trip = Trip(
            partition=partition, dead_letters_in_window=part.dead_letters, window_messages=len(part.outcomes),
            consecutive=part.consecutive, reason=reason,
        )
        return False

    def forget(self, partitions: Iterable[Hashable]) -> None:
        """Revoked partitions: their next owner counts them afresh (an open breaker stays open)."""
        for partition in partitions:
            self._partitions.pop(partition, None)

    def _push(self, part: _Partition, dead_letter: bool, offset: int | None = None) -> None:
        if len(part.outcomes) >= self.limit.window:
            oldest = part.outcomes.popleft()
            part.dead_letters -= oldest[0]
            if oldest[1] is not None:
                part.valid_at.pop(oldest[1], None)
        entry = [dead_letter, offset]
        part.outcomes.append(entry)
        part.dead_letters += dead_letter
        if offset is not None and not dead_letter:
            part.valid_at[offset] = entry

    def _trailing_dead_letters(self, part: _Partition) -> int:
        """The run of dead letters at the end of the window (bounded by the limit that cares)."""
        run, cap = 0, self.limit.max_consecutive + 1 if self.limit.max_consecutive else 0
        for dead_letter, _ in reversed(part.outcomes):
            if not dead_letter or run >= cap:
                break
            run += 1
        return run
