"""Fault injection at the pipeline's boundaries, for tests only.

The embedded Qdrant engine cannot be "stopped" like a server, and a model rarely fails
on cue, so tests wrap the real parts in these layers. Nothing in the worker imports
this module.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from processors.embedder import Embedder, Embeddings
from processors.sink import DocumentWrite, Hit, Point, VectorSink


class InjectedFault(Exception):
    pass


class FailingSink:
    """Wraps a real sink; while `failing` is set, or for the next `fail_next` calls, upserts raise."""

    def __init__(self, inner: VectorSink) -> None:
        self.inner = inner
        self.collection = inner.collection
        self.failing = False
        self.fail_next = 0
        self.failed_calls = 0

    async def ensure_collection(self, dim: int, **checks: Any) -> None:
        await self.inner.ensure_collection(dim, **checks)

    async def upsert(self, points: Sequence[Point]) -> None:
        if self.failing or self.fail_next > 0:
            self.fail_next = max(0, self.fail_next - 1)
            self.failed_calls += 1
            raise InjectedFault("injected upsert failure")
        await self.inner.upsert(points)

    async def write(self, writes: Sequence[DocumentWrite]) -> int:
        if self.failing or self.fail_next > 0:
            self.fail_next = max(0, self.fail_next - 1)
            self.failed_calls += 1
            raise InjectedFault("injected write failure")
        return await self.inner.write(writes)

    async def count(self) -> int:
        return await self.inner.count()

    async def search(self, vector: np.ndarray, limit: int = 5) -> list[Hit]:
        return await self.inner.search(vector, limit)

    async def close(self) -> None:
        await self.inner.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class PoisonEmbedder:
    """Wraps a real embedder; any batch holding a text with `marker` raises, as a model might."""

    def __init__(self, inner: Embedder, *, marker: str = "POISON", fail_first_calls: int = 0) -> None:
        self.inner = inner
        self.marker = marker
        self.fail_first_calls = fail_first_calls
        self.down_until = 0.0
        """time.monotonic() until which every call fails (a model or driver outage)."""
        self.calls = 0
        self.name, self.dim, self.device, self.max_tokens = inner.name, inner.dim, inner.device, inner.max_tokens
        self.version, self.special_tokens = inner.version, inner.special_tokens
        self.max_tokens_per_char = inner.max_tokens_per_char

    def embed(self, texts: Sequence[str], token_counts: Sequence[int] | None = None) -> Embeddings:
        self.calls += 1
        if self.calls <= self.fail_first_calls:
            raise InjectedFault("injected transient model failure")
        import time

        if time.monotonic() < self.down_until:
            raise InjectedFault("injected model outage")
        if any(self.marker in text for text in texts):
            raise InjectedFault("injected model failure on a poison text")
        return self.inner.embed(texts, token_counts)

    def token_offsets(self, texts: Sequence[str]) -> list[list[tuple[int, int]]]:
        return self.inner.token_offsets(texts)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return self.inner.count_tokens(texts)

    def estimate_tokens(self, text: str) -> int:
        return self.inner.estimate_tokens(text)


class SlowCache:
    """Wraps a real cache; every call first waits a random time (seeded), so batches race."""

    def __init__(self, inner: Any, *, max_delay_seconds: float = 0.02, seed: int = 0) -> None:
        import random

        self.inner = inner
        self.max_delay_seconds = max_delay_seconds
        self._random = random.Random(seed)

    async def _delay(self) -> None:
        import asyncio

        await asyncio.sleep(self._random.uniform(0, self.max_delay_seconds))  # injected latency, not synchronization

    async def get_many(self, hashes: Sequence[str], dim: int) -> list[np.ndarray | None]:
        await self._delay()
        return await self.inner.get_many(hashes, dim)

    async def set_many(self, items: Sequence[tuple[str, np.ndarray]]) -> None:
        await self._delay()
        await self.inner.set_many(items)

    async def healthy(self) -> bool:
        return await self.inner.healthy()

    async def close(self) -> None:
        await self.inner.close()
