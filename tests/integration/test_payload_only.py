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


class Interloper:
    """An engine where another process's write lands between our read of chunk 0 and our payload rewrite."""

    def __init__(self, engine: Any, other: Any) -> None:
        self.engine, self.other = engine, other

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    def overwrite_payloads(self, writes: Any) -> None:
        self.engine.upsert_points(list(self.other.points), [self.other])
        self.engine.overwrite_payloads(writes)


def one_chunk(doc_id: str, text_hash: str, vector: np.ndarray, version: int, **metadata: Any) -> Any:
    from processors.sink import DocumentWrite, Point, version_payload

    v = Version("t/0", version)
    payload = {"id": doc_id, "chunk_index": 0, "chunk_count": 1, "content_hash": text_hash, "metadata": metadata,
               **version_payload(v)}
    return DocumentWrite(doc_id=doc_id, points=(Point(id=point_id(doc_id), vector=vector, payload=payload),), version=v)


async def test_a_text_written_by_another_process_meanwhile_never_gets_our_kept_vector(kind, tmp_path):
    """Read v1 (text A); another writer lands v2 (text B); our v3 (text A, new metadata) must not keep B's vector."""
    from processors.sink import replace_chunks

    sink = make_store(kind, tmp_path, f"r{uuid.uuid4().hex[:6]}")
    sink.conditional_writes = True  # what a server gets: other processes write there
    try:
        await sink.ensure_collection(8)
        rng = np.random.default_rng(5)
        a, b = (v / np.linalg.norm(v) for v in rng.standard_normal((2, 8)).astype(np.float32))
        await sink._call(replace_chunks, sink, [one_chunk("d", "hash-A", a, 1, rev=1)])
        ours = one_chunk("d", "hash-A", a, 3, rev=3)
        report = await sink._call(replace_chunks, Interloper(sink, one_chunk("d", "hash-B", b, 2, rev=2)), [ours])
        vector, payload = await stored(sink, "d")
        assert payload["content_hash"] == "hash-A" and payload["metadata"] == {"rev": 3} and payload["version"] == 3
        assert np.allclose(vector, a, atol=1e-6), "text A stored with the other writer's vector"
        assert report.payload_only == 0, "the rewrite that matched nothing is not counted as one"
    finally:
        await sink.close()
