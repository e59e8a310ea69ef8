"""The last step: a message's result or dead letter is acknowledged, so it is finished.

Owns: the offset tracker's `finish` and the count of buffered messages and bytes (the one
place they change). Must not: commit (the Worker commits the tracker's finished prefix).
"""

from __future__ import annotations

from typing import Iterable

from streams.offsets import OffsetTracker
from streams.steps import Fetched, Inline


class Finish(Inline):
    def __init__(self, *, tracker: OffsetTracker) -> None:
        self.tracker = tracker
        self.buffered_messages = 0
        self.buffered_bytes = 0

    def admit(self, item: Fetched) -> None:
        """A fetched message enters the steps."""
        self.buffered_messages += 1
        self.buffered_bytes += item.size

    def release(self, item: Fetched) -> None:
        """Stop counting a message without finishing it (fenced or dropped: the next owner replays it)."""
        self.buffered_messages -= 1
        self.buffered_bytes -= item.size

    def submit(self, items: Iterable[Fetched]) -> None:
        for item in items:
            self.tracker.finish(item.tp, item.offset)
            self.release(item)
