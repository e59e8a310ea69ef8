"""Where a message's life is recorded as finished, and what may be committed.

A message is registered when fetched and finished when its result or dead letter is
acknowledged. Per partition, the committable offset is one past the longest prefix of
finished messages: out-of-order completion never commits past an unfinished message.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Hashable, Iterable


@dataclass(slots=True)
class _Partition:
    pending: deque[int] = field(default_factory=deque)
    """Fetched offsets not yet passed by the commit point, in fetch (= offset) order."""
    timestamps: dict[int, float] = field(default_factory=dict)
    done: set[int] = field(default_factory=set)
    committable: int | None = None
    committed: int | None = None


class OffsetTracker:
    def __init__(self) -> None:
        self._partitions: dict[Hashable, _Partition] = {}

    def register(self, tp: Hashable, offset: int, timestamp: float = 0.0) -> bool:
        """Track a fetched message; False when it is already tracked or finished (a re-fetch)."""
        part = self._partitions.get(tp)
        if part is None:
            part = self._partitions[tp] = _Partition()
        if part.committed is not None and offset < part.committed and not part.pending:
            # The log went backwards (a broker that lost its data): start this partition over.
            part = self._partitions[tp] = _Partition()
        if (part.pending and offset <= part.pending[-1]) or (part.committable is not None and offset < part.committable):
            return False
        part.pending.append(offset)
        part.timestamps[offset] = timestamp
        return True

    def finish(self, tp: Hashable, offset: int) -> None:
        part = self._partitions.get(tp)
        if part is None or offset not in part.timestamps:
            return  # revoked meanwhile, or already passed
        part.done.add(offset)
        while part.pending and part.pending[0] in part.done:
            head = part.pending.popleft()
            part.done.discard(head)
            part.timestamps.pop(head, None)
            part.committable = head + 1

    def to_commit(self, tps: Iterable[Hashable] | None = None) -> dict[Hashable, int]:
        """Offsets to commit now (only partitions whose commit point moved)."""
        chosen = self._partitions if tps is None else {tp: self._partitions[tp] for tp in tps if tp in self._partitions}
        return {
            tp: part.committable
            for tp, part in chosen.items()
            if part.committable is not None and part.committable != part.committed
        }

    def advance_idle(self, tp: Hashable, position: int) -> bool:
        """With nothing of `tp` unfinished, move its commit point to the consumer's position.

        Past records the consumer never sees (transaction markers) the finished prefix stops
        short of the log end; the position does not. True when the commit point moved.
        """
        part = self._partitions.get(tp)
        if part is None or part.pending or part.committable is None or position <= part.committable:
            return False
        part.committable = position
        return True

    def mark_committed(self, offsets: dict[Hashable, int]) -> None:
        for tp, offset in offsets.items():
            if tp in self._partitions:
                self._partitions[tp].committed = offset

    def set_committed(self, tp: Hashable, offset: int) -> None:
        """The group's committed offset learned at assignment."""
        part = self._partitions.setdefault(tp, _Partition())
        part.committed = offset
        if part.committable is None:
            part.committable = offset

    def committed(self, tp: Hashable) -> int | None:
        part = self._partitions.get(tp)
        return None if part is None else part.committed

    def oldest_pending_timestamp(self, tp: Hashable) -> float | None:
        part = self._partitions.get(tp)
        if part is None or not part.pending:
            return None
        return part.timestamps.get(part.pending[0])

    def pending_count(self, tp: Hashable | None = None) -> int:
        if tp is not None:
            part = self._partitions.get(tp)
            return 0 if part is None else len(part.pending) - len(part.done)
        return sum(len(p.pending) - len(p.done) for p in self._partitions.values())

    def forget(self, tps: Iterable[Hashable]) -> None:
        """Drop revoked partitions: their unfinished messages belong to the next owner."""
        for tp in tps:
            self._partitions.pop(tp, None)

    def partitions(self) -> list[Hashable]:
        return list(self._partitions)
