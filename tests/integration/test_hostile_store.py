"""Hostile data at the store's edge: ids that name other chunks, poisoned cache values, refused writes.

Each test here failed on a73af8e (the hardening issue's findings 1-3) and runs on every
embedded engine (qdrant-client in memory and on disk, qdrant-edge) with a real redis-server
where the cache is involved; the embedder is the no-I/O `WordEmbedder`.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from typing import Any, AsyncIterator

import numpy as np
import pytest

from doubles import DIM, HostileEmbedder, WordEmbedder
from processors.cache import RedisCache
from processors.errors import SinkConfigError
from processors.pipeline import Pipeline, PipelineHooks
from processors.sink import Point
from schemas import InputEvent, Version, content_hash, legacy_point_id, point_id
from support import STORE_KINDS as KINDS, make_store as make, put_points

pytestmark = pytest.mark.parametrize("kind", KINDS)

LONG = " ".join(f"word{i}" for i in range(12))  # 3 chunks at max_tokens 6 (4 words a chunk, 1 of overlap)


@contextlib.asynccontextmanager
async def started(kind: str, tmp_path, embedder, **options) -> AsyncIterator[tuple[Pipeline, Any]]:
    """A started pipeline on a fresh collection of `kind`; both closed after."""
    sink = make(kind, tmp_path, f"c{uuid.uuid4().hex[:6]}")
    pipeline = Pipeline(embedder=embedder, sink=sink, **options)
    try:
        await pipeline.start()
        yield pipeline, sink
    finally:
        await pipeline.close()
        await sink.close()


def upsert(doc_id: str, text: str) -> InputEvent:
    return InputEvent(id=doc_id, text=text)


def delete(doc_id: str) -> InputEvent:
    return InputEvent(id=doc_id, text="", op="delete")


async def stored_ids(sink) -> dict[str, list[int]]:
    """Each document's stored chunk indices."""
    found: dict[str, list[int]] = {}
    for p in await sink.points(with_vectors=False):
        found.setdefault(p.payload["id"], []).append(p.payload["chunk_index"])
    return {k: sorted(v) for k, v in found.items()}


async def test_an_id_with_a_hash_never_names_another_documents_chunk(kind, tmp_path):
    async with started(kind, tmp_path, WordEmbedder(max_tokens=6)) as (pipeline, sink):
        await pipeline.process([upsert("a#1", "alone")])
        await pipeline.process([upsert("a", LONG)])
        chunks = len((await stored_ids(sink))["a"])
        assert chunks >= 3
        assert await stored_ids(sink) == {"a#1": [0], "a": list(range(chunks))}
        await pipeline.process([delete("a#1")])
        assert await stored_ids(sink) == {"a": list(range(chunks))}
        await pipeline.process([upsert("b", LONG)])
        await pipeline.process([upsert("b#2", "second")])
        assert await stored_ids(sink) == {"a": list(range(chunks)), "b": list(range(chunks)), "b#2": [0]}


async def test_a_collection_with_the_old_chunk_ids_is_refused_naming_reembed(kind, tmp_path):
    sink = make(kind, tmp_path, f"c{uuid.uuid4().hex[:6]}")
    try:
        await sink.ensure_collection(DIM)
        vector = np.eye(DIM, dtype=np.float32)[0]
        await put_points(sink, [
            Point(id=point_id("a"), vector=vector, payload={"id": "a", "chunk_index": 0, "chunk_count": 2}),
            Point(id=legacy_point_id("a", 1), vector=vector, payload={"id": "a", "chunk_index": 1, "chunk_count": 2}),
        ])
        with pytest.raises(SinkConfigError, match="reembed"):
            await sink.ensure_collection(DIM)
    finally:
        await sink.close()


@pytest.mark.parametrize("poison", ["nan", "inf", "not_unit", "garbage_of_the_right_size"])
async def test_a_poisoned_cache_value_is_a_miss_and_embedded_again(kind, tmp_path, services, poison):
    cache = RedisCache(url=services.redis_url, prefix=f"test:{uuid.uuid4().hex}:")
    refused: list[int] = []
    embedder = WordEmbedder()
    text = "a text someone poisoned"
    values = {
        "nan": np.full(DIM, np.nan, dtype=np.float32),
        "inf": np.full(DIM, np.inf, dtype=np.float32),
        "not_unit": np.full(DIM, 3.0, dtype=np.float32),
        "garbage_of_the_right_size": np.frombuffer(b"\xff" * (4 * DIM), dtype=np.float32),
    }
    await cache.set_many([(content_hash(embedder.name, text), values[poison])])
    hooks = PipelineHooks(on_cache_invalid=refused.append)
    try:
        async with started(kind, tmp_path, embedder, cache=cache, hooks=hooks) as (pipeline, sink):
            (outcome,) = await asyncio.wait_for(pipeline.process([upsert("p", text)]), timeout=20)
            assert outcome.result is not None and outcome.result.cached is False
            (point,) = await sink.points()
            assert np.isfinite(point.vector).all() and abs(float(np.linalg.norm(point.vector)) - 1) < 1e-3
            assert refused == [1]
            (healed,) = await cache.get_many([content_hash(embedder.name, text)], DIM)
            assert healed is not None and np.isfinite(healed).all()  # the fill replaced the poison
    finally:
        await cache.close()


async def test_a_non_finite_model_output_is_that_texts_dead_letter(kind, tmp_path):
    async with started(kind, tmp_path, HostileEmbedder(), embed_retry_seconds=0.05) as (pipeline, sink):
        outcomes = await asyncio.wait_for(
            pipeline.process([upsert("ok-1", "fine text"), upsert("bad", "an OVERFLOW here"), upsert("ok-2", "also fine")]), timeout=20
        )
        assert [o.error_kind for o in outcomes] == [None, "embed_failed", None]
        assert "non-finite" in (outcomes[1].error_message or "")
        assert sorted(await stored_ids(sink)) == ["ok-1", "ok-2"]


async def test_a_batch_of_one_refused_document_is_its_dead_letter(kind, tmp_path):
    async with started(kind, tmp_path, HostileEmbedder()) as (pipeline, sink):
        (outcome,) = await asyncio.wait_for(pipeline.process([upsert("bad", "WRONGDIM first of all")]), timeout=20)
        assert outcome.error_kind == "store_rejected" and "of size 11" in (outcome.error_message or "")
        # Refused before anything was sent: none of its chunks is stored (the local engine writes point by point).
        (outcome,) = await pipeline.process([upsert("long-bad", "WRONGDIM " + " ".join(f"w{i}" for i in range(30)))])
        assert outcome.error_kind == "store_rejected"
        assert await stored_ids(sink) == {}


async def test_a_document_the_store_refuses_is_its_dead_letter_and_the_rest_are_written(kind, tmp_path):
    rejected: list[int] = []
    async with started(kind, tmp_path, HostileEmbedder(), hooks=PipelineHooks(on_store_rejected=rejected.append)) as (pipeline, sink):
        events = [upsert(f"ok-{i}", f"fine text {i}") for i in range(5)]
        events.insert(2, upsert("bad", "WRONGDIM text"))
        outcomes = await asyncio.wait_for(pipeline.process(events), timeout=20)
        kinds = {o.event.id: o.error_kind for o in outcomes}
        assert kinds.pop("bad") == "store_rejected"
        assert set(kinds.values()) == {None}
        assert sorted(await stored_ids(sink)) == sorted(f"ok-{i}" for i in range(5))
        assert rejected == [1]


async def test_a_deleted_collection_is_an_outage_not_dead_letters(kind, tmp_path):
    """Every document fails for a reason that is not theirs: held and retried, nothing dead-lettered."""
    if kind == "edge":
        pytest.skip("a qdrant-edge shard cannot be deleted under an open sink")
    states: list[bool] = []
    async with started(kind, tmp_path, WordEmbedder(), hooks=PipelineHooks(on_sink_state=states.append)) as (pipeline, sink):
        await sink._call(sink._client.delete_collection, sink.collection)
        task = asyncio.create_task(pipeline.process([upsert(f"doc-{i}", f"text {i}") for i in range(3)]))
        deadline = asyncio.get_running_loop().time() + 10
        while False not in states:
            assert asyncio.get_running_loop().time() < deadline, "the failure was not reported as an outage"
            assert not task.done(), task.result()
            await asyncio.sleep(0.01)
        assert not task.done()  # held and retried, nothing dead-lettered
        await sink.ensure_collection(DIM)  # the operator restores it: the held batch lands
        outcomes = await asyncio.wait_for(task, timeout=30)
        assert [o.error_kind for o in outcomes] == [None, None, None]
        assert sorted(await stored_ids(sink)) == ["doc-0", "doc-1", "doc-2"]


# ---- writes that cannot go backwards (the version guard) ----------------------------------------


def v(value: int, source: str = "in/0") -> Version:
    return Version(source, value)


async def stored_state(sink) -> dict[str, tuple[int, int | None, str]]:
    """Each document as (chunks, version, text of chunk 0)."""
    state: dict[str, tuple[int, int | None, str]] = {}
    for p in await sink.points(with_vectors=False):
        if p.payload["chunk_index"] == 0:
            state[p.payload["id"]] = (p.payload["chunk_count"], p.payload.get("version"), p.payload["text"])
    return state


async def test_an_older_write_never_lands_over_a_newer_one(kind, tmp_path):
    """Two writers on one store (a rebalance's old and new owner): the old owner's late writes are skipped."""
    sink = make(kind, tmp_path, f"c{uuid.uuid4().hex[:6]}")
    stale: list[int] = []
    new_owner = Pipeline(embedder=WordEmbedder(max_tokens=6), sink=sink)
    old_owner = Pipeline(embedder=WordEmbedder(max_tokens=6), sink=sink, hooks=PipelineHooks(on_stale=stale.append))
    await new_owner.start()
    try:
        await new_owner.process([upsert("x", LONG), upsert("y", "y two"), upsert("z", "z two")], versions=[v(10), v(11), v(12)])
        chunks = (await stored_state(sink))["x"][0]
        outcomes = await old_owner.process(
            [upsert("x", "x one"), delete("y"), upsert("z", "z one")], versions=[v(5), v(6), v(7)]
        )
        assert all(o.result is not None for o in outcomes)  # skipped, never an error
        state = await stored_state(sink)
        assert state["x"][:2] == (chunks, 10)
        assert (state["y"], state["z"]) == ((1, 11, "y two"), (1, 12, "z two"))
        assert sum(stale) == 3
        # A replay of the same offsets converges (equal versions apply), a later one wins.
        await old_owner.process([upsert("y", "y two")], versions=[v(11)])
        await old_owner.process([upsert("y", "y three"), delete("z")], versions=[v(20), v(21)])
        state = await stored_state(sink)
        assert sorted(state) == ["x", "y"] and state["y"] == (1, 20, "y three")
    finally:
        await new_owner.close()
        await old_owner.close()
        await sink.close()


async def test_versions_of_different_partitions_are_not_compared(kind, tmp_path):
    """A keyless producer spreads an id over partitions: there the last write wins, as without the guard."""
    async with started(kind, tmp_path, WordEmbedder()) as (pipeline, sink):
        await pipeline.process([upsert("k", "from partition zero")], versions=[v(100, "in/0")])
        await pipeline.process([upsert("k", "from partition one")], versions=[v(3, "in/1")])
        assert (await stored_state(sink))["k"] == (1, 3, "from partition one")
        await pipeline.process([upsert("legacy", "unversioned")])
        await pipeline.process([upsert("legacy", "versioned now")], versions=[v(1)])
        assert (await stored_state(sink))["legacy"] == (1, 1, "versioned now")


async def test_the_engine_itself_refuses_an_older_upsert(kind, tmp_path):
    """The guard is in the engine's conditional write too, not only in the read before it (a race between writers)."""
    from processors.sink import DocumentWrite, version_payload

    sink = make(kind, tmp_path, f"c{uuid.uuid4().hex[:6]}")
    sink.conditional_writes = True  # what a server gets by default
    try:
        await sink.ensure_collection(DIM)
        vector = np.eye(DIM, dtype=np.float32)[0]

        def write(value: int, text: str) -> DocumentWrite:
            payload = {"id": "r", "chunk_index": 0, "chunk_count": 1, "text": text, **version_payload(v(value))}
            return DocumentWrite("r", (Point(id=point_id("r"), vector=vector, payload=payload),), v(value))

        newer, older = write(9, "newer"), write(4, "older")
        await sink.write([newer])
        await sink._call(sink.upsert_points, older.points, [older])  # past the read: only the engine's condition stands
        assert (await stored_state(sink))["r"] == (1, 9, "newer")
    finally:
        await sink.close()


async def test_another_model_of_the_same_size_is_refused_at_start_naming_reembed(kind, tmp_path):
    class OtherWords(WordEmbedder):
        name = "other-words"

    class NewWeights(WordEmbedder):
        version = "sha256:0123456789abcdef"

    sink = make(kind, tmp_path, f"c{uuid.uuid4().hex[:6]}")
    try:
        first = Pipeline(embedder=NewWeights(), sink=sink)
        await first.start()
        await first.process([upsert("m", "written by one model")])
        await first.close()
        for other in (OtherWords(), WordEmbedder()):  # another name; the same name with other weights
            with pytest.raises(SinkConfigError, match="reembed"):
                await Pipeline(embedder=other, sink=sink).start()
        same = Pipeline(embedder=NewWeights(), sink=sink)
        await same.start()  # the model that wrote it goes on
        await same.close()
    finally:
        await sink.close()
