"""Metadata-only changes keep the vector: only the payload of a one-chunk document is rewritten.

On every embedded engine (qdrant-client in memory and on a path, qdrant-edge) and with the
engine-side version condition on and off. The embedder here drifts on purpose: each call
returns a slightly different vector for the same text, so a stored vector that did not change
proves it was not written again.
"""

from __future__ import annotations

import contextlib
import uuid
from typing import Any, AsyncIterator

import numpy as np
import pytest

from doubles import WordEmbedder
from processors.embedder import Embeddings
from processors.pipeline import Pipeline, PipelineHooks
from schemas import InputEvent, Version, point_id
from support import STORE_KINDS, make_store, retrieve

pytestmark = pytest.mark.parametrize("kind", STORE_KINDS)


class DriftingEmbedder(WordEmbedder):
    """Word vectors, nudged a little more on every call (still of unit norm)."""

    def embed(self, texts, token_counts=None) -> Embeddings:
        base = super().embed(texts, token_counts)
        nudged = base.vectors + 0.01 * len(self.calls)
        return Embeddings(nudged / np.linalg.norm(nudged, axis=1, keepdims=True), base.truncated)


@contextlib.asynccontextmanager
async def started(kind: str, tmp_path: Any, **sink_options: Any) -> AsyncIterator[tuple[Pipeline, Any, dict[str, list[int]]]]:
    sink = make_store(kind, tmp_path, f"p{uuid.uuid4().hex[:6]}")
    for name, value in sink_options.items():
        setattr(sink, name, value)
    counts: dict[str, list[int]] = {"payload_only": [], "stale": []}
    hooks = PipelineHooks(on_payload_only=counts["payload_only"].append, on_stale=counts["stale"].append)
    pipeline = Pipeline(embedder=DriftingEmbedder(max_tokens=6), sink=sink, hooks=hooks)
    try:
        await pipeline.start()
        yield pipeline, sink, counts
    finally:
        await pipeline.close()
        await sink.close()


def event(doc_id: str, text: str, **metadata: Any) -> InputEvent:
    return InputEvent(id=doc_id, text=text, metadata=metadata)


async def stored(sink: Any, doc_id: str) -> tuple[np.ndarray, dict[str, Any]]:
    return (await retrieve(sink, [point_id(doc_id)]))[point_id(doc_id)]


@pytest.mark.parametrize("conditional", [False, True])
async def test_a_metadata_only_update_rewrites_the_payload_and_keeps_the_vector(kind, tmp_path, conditional):
    async with started(kind, tmp_path, conditional_writes=conditional) as (pipeline, sink, counts):
        await pipeline.process([event("a", "reset a password", lang="en", rev=1), event("b", "other text", rev=1)],
                               versions=[Version("t/0", 1), Version("t/0", 2)])
        vector_before, _ = await stored(sink, "a")
        await pipeline.process([event("a", "reset a password", lang="de", rev=2)], versions=[Version("t/0", 3)])
        vector_after, payload = await stored(sink, "a")
        assert payload["metadata"] == {"lang": "de", "rev": 2}
        assert payload["version"] == 3
        assert np.array_equal(vector_before, vector_after), "the vector was written again"
        assert sum(counts["payload_only"]) == 1
        assert len(await sink.points(with_vectors=False)) == 2


async def test_a_changed_text_is_a_full_write(kind, tmp_path):
    async with started(kind, tmp_path) as (pipeline, sink, counts):
        await pipeline.process([event("a", "reset a password", rev=1)])
        vector_before, _ = await stored(sink, "a")
        await pipeline.process([event("a", "reset a passphrase", rev=2)])
        vector_after, payload = await stored(sink, "a")
        assert payload["metadata"] == {"rev": 2} and payload["text"] == "reset a passphrase"
        assert not np.array_equal(vector_before, vector_after)
        assert counts["payload_only"] == []


async def test_a_multi_chunk_document_is_rewritten_whole_even_with_the_same_text(kind, tmp_path):
    long_text = " ".join(f"word{i}" for i in range(12))  # several chunks at max_tokens 6
    async with started(kind, tmp_path) as (pipeline, sink, counts):
        await pipeline.process([event("a", long_text, rev=1)])
        await pipeline.process([event("a", long_text, rev=2)])
        chunks = [p for p in await sink.points(with_vectors=False) if p.payload["id"] == "a"]
        assert len(chunks) >= 3 and all(p.payload["metadata"] == {"rev": 2} for p in chunks)
        assert counts["payload_only"] == []


async def test_a_stale_metadata_update_is_skipped_not_rewritten(kind, tmp_path):
    async with started(kind, tmp_path) as (pipeline, sink, counts):
        await pipeline.process([event("a", "same text", rev=5)], versions=[Version("t/0", 5)])
        await pipeline.process([event("a", "same text", rev=4)], versions=[Version("t/0", 4)])
        _, payload = await stored(sink, "a")
        assert payload["metadata"] == {"rev": 5} and payload["version"] == 5
        assert sum(counts["stale"]) == 1 and counts["payload_only"] == []


async def test_turned_off_every_update_writes_the_vector(kind, tmp_path):
    async with started(kind, tmp_path, payload_only_writes=False) as (pipeline, sink, counts):
        await pipeline.process([event("a", "reset a password", rev=1)])
        vector_before, _ = await stored(sink, "a")
        await pipeline.process([event("a", "reset a password", rev=2)])
        vector_after, payload = await stored(sink, "a")
        assert payload["metadata"] == {"rev": 2}
        assert not np.array_equal(vector_before, vector_after) and counts["payload_only"] == []
