"""Batches in flight through the pipeline: cache, embed, write to the store, in launch order.

Owns: the pipelining depth (`max_in_flight_batches` tasks), the two turns a batch takes
when it is launched (its place in the write order and in the publishing order), and the
hand-over of each batch's outcomes to `Publish`. Must not: fetch, commit, or write for a
message that is no longer live (the pipeline checks `live` before each write).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Callable

from processors.pipeline import Pipeline
from schemas import Version
from streams.steps import Fetched, TaskSet
from streams.steps.publish import Publish
from streams.tracing import Tracing

log = logging.getLogger(__name__)


class EmbedAndStore:
    def __init__(
        self,
        *,
        pipeline: Pipeline,
        publish: Publish,
        live: Callable[[Fetched], bool],
        depth: int,
        on_error: Callable[[BaseException], None],
        on_batch: Callable[[list[Fetched]], None] = lambda batch: None,
        on_batch_done: Callable[[list[Fetched], float], None] = lambda batch, seconds: None,
        tracing: Tracing | None = None,
        versioned: bool = True,
    ) -> None:
        self.pipeline = pipeline
        self.versioned = versioned
        self.publish = publish
        self.live = live
        self.depth = depth
        self._on_slot_free: Callable[[], None] = lambda: None
        self._on_batch = on_batch
        self._on_batch_done = on_batch_done
        self.tracing = tracing or Tracing(enabled=False)
        self.running = TaskSet(on_error=on_error, on_done=self._slot_freed)
        self.tasks = self.running.tasks
        self.stopping = False

    def when_a_slot_frees(self, poll: Callable[[], None]) -> None:
        """Call `poll` (the `Batch` step's) as a batch finishes: a due batch starts at once, not at the next fetch round."""
        self._on_slot_free = poll

    def has_room(self) -> bool:
        return len(self.tasks) < self.depth

    def submit(self, batch: list[Fetched]) -> None:
        if not self.has_room():
            raise RuntimeError(f"a batch submitted with {len(self.tasks)} in flight: `Batch` asks `has_room` first")
        # Both turns are taken here, before the task's first await: launch order is offset order.
        write_turn, publish_turn = self.pipeline.take_turn(), self.publish.take_turn()
        task = self.running.start(self._run(batch, write_turn, publish_turn))
        # A task cancelled before it ever ran skips its `finally`: end its turns here too.
        task.add_done_callback(lambda _, w=write_turn, p=publish_turn: (w.end(), p.end()))

    async def _run(self, batch: list[Fetched], write_turn, publish_turn) -> None:  # type: ignore[no-untyped-def]
        started = time.monotonic()
        batch_id = uuid.uuid4().hex[:12]
        if log.isEnabledFor(logging.DEBUG):
            log.debug("batch of %d messages: %s", len(batch), positions(batch), extra={"batch_id": batch_id})
        self._on_batch(batch)
        with self.tracing.batch([item.headers for item in batch], **{"embedworker.batch_id": batch_id}):
            try:
                outcomes = await self.pipeline.process(
                    [item.event for item in batch],  # type: ignore[misc]
                    turn=write_turn,
                    live=lambda index: self.live(batch[index]),
                    versions=[version_of(i) for i in batch] if self.versioned else None,
                )
            finally:
                write_turn.end()
            with self.tracing.phase("publish"):
                await self.publish.submit_batch(batch, outcomes, publish_turn, batch_id=batch_id)
        self._on_batch_done(batch, time.monotonic() - started)

    def _slot_freed(self) -> None:
        if not self.stopping:
            self._on_slot_free()  # the freed slot takes the next due batch now

    def poll(self) -> None:
        return None

    async def wait_for_room(self, deadline: float | None) -> None:
        if self.has_room() or not self.tasks:
            return
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        await asyncio.wait(set(self.tasks), timeout=timeout, return_when=asyncio.FIRST_COMPLETED)

    async def join(self, deadline: float | None = None) -> None:
        await self.running.join(deadline)

    def close(self) -> None:
        """Cancel what is still in flight: abandoned, uncommitted, replayed by the next owner."""
        self.running.close()


def version_of(item: Fetched) -> Version:
    """The event's own version (`user`), else its offset within its partition."""
    if item.version is not None:
        return Version("user", item.version)
    return Version(f"{item.tp.topic}/{item.tp.partition}", item.offset)


def positions(batch: list[Fetched]) -> str:
    """`topic[partition]@first-last` per partition of a batch, for its debug line."""
    spans: dict[tuple[str, int], list[int]] = {}
    for item in batch:
        span = spans.setdefault((item.tp.topic, item.tp.partition), [item.offset, item.offset])
        span[0], span[1] = min(span[0], item.offset), max(span[1], item.offset)
    return ", ".join(f"{topic}[{partition}]@{first}-{last}" for (topic, partition), (first, last) in sorted(spans.items()))
