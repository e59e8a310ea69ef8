"""The per-message path as a chain of small steps, in the manner of Sentry Arroyo's strategies.

    fetched ─► Decode ─► Batch ─► EmbedAndStore ─► Publish ─► Finish
                 └── bad input ──► DeadLetters ──────┘

Each step has one small interface: `submit` (take work), `poll` (move finished work on),
`join(deadline)` (finish what is inside, until the deadline) and `close` (drop what is
left: it is uncommitted, so the next owner replays it). A step never refuses work: the one
step with a limit (`EmbedAndStore`, its pipeline depth) says so through `has_room`, which
`Batch` asks before it hands a batch on; what is not handed on waits in the batcher, and the
consumer pauses on the `Backpressure` signals (buffered messages and bytes, batches waiting,
memory, the store, the dead-letter breaker), not on a step's refusal. Owns: what happens to a message
between fetch and commit. Must not: fetch, pause, commit or handle rebalances (the
`Worker` does), nor touch the store or the model except through the `Pipeline`.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, Callable, Coroutine, Generic, Protocol, TypeVar

from streams.backends import TopicPartition

from schemas import InputEvent

T = TypeVar("T", contravariant=True)


class Step(Protocol, Generic[T]):
    def submit(self, message: T) -> None: ...

    def poll(self) -> None: ...

    async def join(self, deadline: float | None = None) -> None: ...

    def close(self) -> None: ...


class Inline:
    """For steps that finish their work inside `submit`: nothing to poll, join or close."""

    def poll(self) -> None:
        return None

    async def join(self, deadline: float | None = None) -> None:
        return None

    def close(self) -> None:
        return None


class TaskSet:
    """The tasks a step runs at once: started, joined until a deadline, cancelled on close.

    `on_error` gets a task's exception (the worker stops); `on_done` runs after each task that
    ended without one (a freed slot). Shared by `EmbedAndStore` and `DeadLetters`.
    """

    def __init__(self, *, on_error: Callable[[BaseException], None], on_done: Callable[[], None] = lambda: None) -> None:
        self.tasks: set[asyncio.Task[None]] = set()
        self.on_error = on_error
        self.on_done = on_done

    def __len__(self) -> int:
        return len(self.tasks)

    def start(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(work)
        self.tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.on_error(task.exception())  # type: ignore[arg-type]
        else:
            self.on_done()

    async def join(self, deadline: float | None = None) -> None:
        if self.tasks:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            await asyncio.wait(set(self.tasks), timeout=timeout)

    def close(self) -> None:
        """Cancel what is still running: abandoned, uncommitted, replayed by the next owner."""
        for task in self.tasks:
            task.cancel()


@dataclass(slots=True)
class Fetched:
    """One fetched record on its way through the steps."""

    tp: TopicPartition
    offset: int
    timestamp: float
    key: bytes | None
    value: bytes | None
    size: int
    epoch: int = 0
    """The assignment of its partition it was fetched under (see `Worker.live`)."""
    event: InputEvent | None = None
    headers: tuple[tuple[str, bytes], ...] = ()
    """The input's Kafka headers that are carried over to its result or dead letter."""
    version: int | None = None
    """The event's own version (`EMBEDWORKER_VERSION_FROM`); None: its offset orders it."""

    @property
    def message_id(self) -> str:
        """Where it came from, as `topic/partition/offset` (unique and replay-stable)."""
        return f"{self.tp.topic}/{self.tp.partition}/{self.offset}"


__all__ = ["Fetched", "Inline", "Step", "TaskSet"]
