"""Micro-batching: events wait here until a batch is due and the pipeline has a free slot.

Owns: the `Batcher` (count, token budget, wait; adaptive to lag) and handing due batches on.
A batch leaves only when `EmbedAndStore` has room, so it never rejects one after taking it.
Must not: process anything.
"""

from __future__ import annotations

import asyncio
import time
from typing import Callable

from streams.batching import QUOTA_RETRY_SECONDS, Batcher
from streams.steps import Fetched
from streams.steps.embed_store import EmbedAndStore


class Batch:
    def __init__(self, *, batcher: Batcher[Fetched], next_step: EmbedAndStore) -> None:
        self.batcher = batcher
        self.next_step = next_step

    def submit(self, item: Fetched, tokens: int) -> None:
        self.batcher.add(item, tokens, time.monotonic())

    def poll(self, *, drain: bool = False) -> None:
        """Hand on every due batch (every buffered one when draining) while there is room."""
        now = time.monotonic()
        while self.next_step.has_room() and (len(self.batcher) if drain else self.batcher.ready(now)):
            batch = self.batcher.take(now)
            if not batch:
                return  # every waiting tenant is over its quota: asked again within QUOTA_RETRY_SECONDS
            self.next_step.submit(batch)

    def seconds_until_due(self) -> float | None:
        """None when nothing could start anyway (no room, or nothing buffered)."""
        if not self.next_step.has_room():
            return None
        return self.batcher.seconds_until_due(time.monotonic())

    def remove(self, predicate: Callable[[Fetched], bool]) -> list[Fetched]:
        return self.batcher.remove(predicate)

    async def join(self, deadline: float | None = None) -> None:
        """Drain: start every buffered batch as slots free, until the deadline."""
        while len(self.batcher) and (deadline is None or time.monotonic() < deadline):
            before = len(self.batcher)
            self.poll(drain=True)
            if len(self.batcher) == before and self.next_step.has_room():
                await asyncio.sleep(QUOTA_RETRY_SECONDS)  # only over-quota events are left: pace until a bucket refills
            await self.next_step.wait_for_room(deadline)

    def close(self) -> None:
        return None
