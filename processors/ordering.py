"""Turns in launch order: the store and the result topic see batches in offset order.

Owns: the order in which concurrent batches may write. A batch takes its `Turn` when it is
launched (synchronously, so launch order is offset order); it may fetch, look up and embed
early, but it writes only once every earlier turn has ended. Must not: know what is written.

A turn ends when its owner is done with it, or abandons it (cancelled, failed, fenced): the
next one then proceeds, and whatever the abandoned batch did not write stays uncommitted
and is replayed, in order, by whoever next owns its partition.
"""

from __future__ import annotations

import asyncio
from types import TracebackType


class Turn:
    """One batch's place in a `Sequencer`; `async with turn:` waits for it, then ends it."""

    __slots__ = ("_previous", "_mine")

    def __init__(self, previous: asyncio.Future[None] | None, mine: asyncio.Future[None]) -> None:
        self._previous = previous
        self._mine = mine

    async def wait(self) -> None:
        """Return once every earlier turn has ended (a cancellation here does not end them)."""
        if self._previous is not None and not self._previous.done():
            await asyncio.shield(self._previous)

    def end(self) -> None:
        """Let the next turn go once every earlier one has ended too; idempotent, safe from a done callback.

        An abandoned turn can end before its predecessor: the next must still wait for that one.
        """
        if self._mine.done():
            return
        previous = self._previous
        if previous is None or previous.done():
            self._mine.set_result(None)
        else:
            previous.add_done_callback(lambda _: None if self._mine.done() else self._mine.set_result(None))

    @property
    def ended(self) -> bool:
        return self._mine.done()

    async def __aenter__(self) -> "Turn":
        try:
            await self.wait()
        except BaseException:
            self.end()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.end()


class Sequencer:
    """Hands out turns; each waits for the one taken before it. Take them on the event loop."""

    def __init__(self) -> None:
        self._last: asyncio.Future[None] | None = None

    def take(self) -> Turn:
        mine = asyncio.get_running_loop().create_future()
        previous, self._last = self._last, mine
        return Turn(previous, mine)

    @property
    def idle(self) -> bool:
        """No turn is waiting or running."""
        return self._last is None or self._last.done()
