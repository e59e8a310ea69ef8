"""Test doubles, for tests only: stand-ins without I/O for unit tests of logic (a word-per-token
embedder, a gated dict cache) and fault layers around real parts (a sink that fails on cue, an
embedder that refuses a poison text). Integration tests use the real parts; these only make races
and failures happen on cue. Nothing shipped imports this module.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from typing import Any, Sequence

import numpy as np

from processors.embedder import Embedder, Embeddings
from processors.sink import DocumentWrite, Hit, VectorStore, WriteReport

DIM = 8


DIM = 8


def vector_of(text: str) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")
    v = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


class WordEmbedder:
    """One token per word; a text of more than `max_tokens - 2` words is long. No I/O, no model."""

    name, dim, device, version, special_tokens, max_tokens_per_char = "words", DIM, "cpu", None, 2, 1

    def __init__(self, *, max_tokens: int = 10, poison: str = "POISON") -> None:
        self.max_tokens = max_tokens
        self.poison = poison
        self.calls: list[list[str]] = []
        self.gate: threading.Event | None = None

    def token_offsets(self, texts: Sequence[str]) -> list[list[tuple[int, int]]]:
        out = []
        for text in texts:
            spans, i = [], 0
            for word in text.split(" "):
                if word:
                    spans.append((i, i + len(word)))
                i += len(word) + 1
            out.append(spans)
        return out

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return [len(s) + 2 for s in self.token_offsets(texts)]

    def estimate_tokens(self, text: str) -> int:
        return len(text.split())

    def embed(self, texts: Sequence[str], token_counts: Sequence[int] | None = None) -> Embeddings:
        self.calls.append(list(texts))
        if self.gate is not None and len(texts) == 1 and not any(self.poison in t for t in texts):
            self.gate.wait(10)  # the older batch's split rounds wait for the newer batch
        if any(self.poison in t for t in texts):
            raise ValueError("poison")
        return Embeddings(np.stack([vector_of(t) for t in texts]), [False] * len(texts))


class GatedCache:
    """A dict cache whose lookups or fills of chosen hashes wait on a gate."""

    def __init__(self) -> None:
        self.values: dict[str, np.ndarray] = {}
        self.get_gates: dict[str, asyncio.Event] = {}
        self.set_gates: dict[str, asyncio.Event] = {}

    async def get_many(self, hashes: Sequence[str], dim: int) -> list[np.ndarray | None]:
        for h in hashes:
            if h in self.get_gates:
                await self.get_gates[h].wait()
        return [self.values.get(h) for h in hashes]

    async def set_many(self, items: Sequence[tuple[str, np.ndarray]]) -> None:
        for h, _ in items:
            if h in self.set_gates:
                await self.set_gates[h].wait()
        self.values.update(items)

    async def healthy(self) -> bool:
        return True

    async def close(self) -> None:
        return None


class InjectedFault(Exception):
    pass


class FailingSink:
    """Wraps a real sink; while `failing` is set, or for the next `fail_next` calls, writes raise."""

    def __init__(self, inner: VectorStore) -> None:
        self.inner = inner
        self.collection = inner.collection
        self.failing = False
        self.fail_next = 0
        self.failed_calls = 0

    async def ensure_collection(self, dim: int, **checks: Any) -> None:
        await self.inner.ensure_collection(dim, **checks)

    async def write(self, writes: Sequence[DocumentWrite]) -> WriteReport:
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


class HostileEmbedder(WordEmbedder):
    """Word vectors, except a NaN vector for texts with OVERFLOW and a vector of the wrong size for WRONGDIM."""

    def embed(self, texts, token_counts=None) -> Embeddings:
        base = super().embed([t.replace("OVERFLOW", "x").replace("WRONGDIM", "x") for t in texts], token_counts)
        vectors = base.vectors.copy()
        for i, text in enumerate(texts):
            if "OVERFLOW" in text:
                vectors[i] = np.nan
        if any("WRONGDIM" in t for t in texts):
            # A model whose output the store refuses for one input: the store is the judge here.
            return _WrongSize(vectors, [i for i, t in enumerate(texts) if "WRONGDIM" in t], base.truncated)
        return Embeddings(vectors, base.truncated)


def _WrongSize(vectors, wrong, truncated) -> Embeddings:
    """Rows as a list: the WRONGDIM ones have DIM + 3 values (unit norm), which every engine refuses."""
    rows = [v if i not in wrong else np.full(DIM + 3, 1 / np.sqrt(DIM + 3), dtype=np.float32) for i, v in enumerate(vectors)]
    return Embeddings(rows, truncated)  # type: ignore[arg-type]
