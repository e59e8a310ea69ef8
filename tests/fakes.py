"""Stand-ins without I/O for unit tests of logic: a word-per-token embedder, a gated dict cache.

Integration tests use the real model and Redis; these only make races and failures happen on cue.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from typing import Sequence

import numpy as np

from processors.embedder import Embeddings

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


