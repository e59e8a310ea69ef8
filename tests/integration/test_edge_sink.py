"""One contract for the vector sinks: QdrantSink (in memory, embedded path) and EdgeSink.

Real numpy vectors with a fixed seed, no model. The SIGKILL test checks that an acknowledged
EdgeSink upsert survives the process being killed (the shard's WAL, before any flush).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import numpy as np
import pytest

from processors.edge_sink import EdgeSink
from processors.errors import SinkConfigError
from processors.sink import Point
from support import STORE_KINDS as KINDS, make_store as make, retrieve, point_ids, put_points

DIM = 32
ROOT = Path(__file__).resolve().parents[2]

PERSISTENT = ["qdrant-path", "edge"]


def unit_vectors(n: int, dim: int = DIM, seed: int = 7) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def points(n: int, seed: int = 7) -> list[Point]:
    vectors = unit_vectors(n, seed=seed)
    return [
        Point(
            id=str(uuid.UUID(int=i + 1)),
            vector=vectors[i],
            payload={"i": i, "text": f"text {i}", "ok": i % 2 == 0, "score": i / 3, "meta": {"tags": ["a", i], "n": None}},
        )
        for i in range(n)
    ]


@pytest.fixture(params=KINDS)
def kind(request) -> str:
    return request.param


@pytest.fixture
async def store(kind, tmp_path):
    """A store of `kind` with its collection made (DIM), closed after the test."""
    sink = make(kind, tmp_path)
    await sink.ensure_collection(DIM)
    yield sink
    await sink.close()


async def test_upsert_count_retrieve(store):
    sink = store
    await sink.ensure_collection(DIM)  # idempotent
    assert await sink.vector_size() == DIM
    batch = points(50)
    await put_points(sink, batch[:25])
    await put_points(sink, batch[25:])
    await put_points(sink, [])
    assert await sink.count() == 50
    got = await retrieve(sink, [p.id for p in batch] + [str(uuid.uuid4())])
    assert set(got) == {p.id for p in batch}
    for p in batch:
        vector, payload = got[p.id]
        assert vector.dtype == np.float32 and np.allclose(vector, p.vector, atol=1e-6)
        assert payload == p.payload
    assert sorted(await point_ids(sink)) == sorted(p.id for p in batch)
    assert await sink.healthy()


async def test_last_write_wins(store):
    sink = store
    first, second = unit_vectors(2, seed=1)
    pid = str(uuid.UUID(int=99))
    await put_points(sink, [Point(pid, first, {"v": 1})])
    await put_points(sink, [Point(pid, second, {"v": 2})])
    # and within one batch, the later point wins
    await put_points(sink, [Point(pid, first, {"v": 3}), Point(pid, second, {"v": 4})])
    assert await sink.count() == 1
    vector, payload = (await retrieve(sink, [pid]))[pid]
    assert payload == {"v": 4} and np.allclose(vector, second, atol=1e-6)


async def test_search_returns_the_nearest_first(store):
    sink = store
    batch = points(200)
    await put_points(sink, batch)
    target = batch[123]
    noisy = target.vector + 0.05 * unit_vectors(1, seed=3)[0]
    hits = await sink.search(noisy, limit=5)
    assert len(hits) == 5
    assert hits[0].id == target.id and hits[0].payload == target.payload
    assert hits[0].score > 0.99 and [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    exact = await sink.search(batch[7].vector, limit=1)
    assert exact[0].id == batch[7].id and abs(exact[0].score - 1.0) < 1e-5


async def test_dimension_mismatch_is_a_clear_error(store):
    sink = store
    with pytest.raises(SinkConfigError, match=f"size {DIM}.*gives {DIM + 1}"):
        await sink.ensure_collection(DIM + 1)


@pytest.mark.parametrize("kind", PERSISTENT)
async def test_data_survives_close_and_reopen(kind, tmp_path):
    batch = points(40)
    sink = make(kind, tmp_path)
    await sink.ensure_collection(DIM)
    await put_points(sink, batch)
    await sink.close()

    sink = make(kind, tmp_path)
    try:
        assert await sink.vector_size() == DIM
        with pytest.raises(SinkConfigError, match=f"size {DIM}"):
            await sink.ensure_collection(DIM * 2)  # the stored dimension is checked on reopen too
        await sink.ensure_collection(DIM)
        assert await sink.count() == 40
        got = await retrieve(sink, [p.id for p in batch])
        assert all(np.allclose(got[p.id][0], p.vector, atol=1e-6) and got[p.id][1] == p.payload for p in batch)
        assert (await sink.search(batch[5].vector, limit=1))[0].id == batch[5].id
    finally:
        await sink.close()


async def test_edge_collections_are_separate_shards(tmp_path):
    sink = EdgeSink(collection="a", path=str(tmp_path))
    other = sink.for_collection("b")
    try:
        assert await other.vector_size() is None
        await sink.ensure_collection(DIM)
        await other.ensure_collection(DIM * 2)
        await put_points(sink, points(3))
        assert (await sink.count(), await other.count()) == (3, 0)
        assert (tmp_path / "a" / "edge_config.json").is_file() and (tmp_path / "b" / "edge_config.json").is_file()
        with pytest.raises(SinkConfigError, match="does not exist"):
            await sink.for_collection("missing").count()
        with pytest.raises(SinkConfigError, match="directory name"):
            EdgeSink(collection="../x", path=str(tmp_path))
    finally:
        await sink.close()


async def test_edge_refuses_a_qdrant_client_store(tmp_path):
    await make("qdrant-path", tmp_path).close()  # leaves meta.json
    sink = EdgeSink(collection="c", path=str(tmp_path))
    try:
        with pytest.raises(SinkConfigError, match="qdrant-client local store"):
            await sink.ensure_collection(DIM)
    finally:
        await sink.close()


async def test_edge_shard_is_one_process_at_a_time(tmp_path):
    sink = EdgeSink(collection="c", path=str(tmp_path))
    second = EdgeSink(collection="c", path=str(tmp_path))
    try:
        await sink.ensure_collection(DIM)
        with pytest.raises(SinkConfigError, match="open elsewhere"):
            await second.ensure_collection(DIM)
    finally:
        await second.close()
        await sink.close()


CHILD = textwrap.dedent(
    """
    import asyncio, sys, time, uuid
    import numpy as np
    from processors.edge_sink import EdgeSink
    from processors.sink import Point

    async def main(path, n, dim):
        # A flush interval far beyond the test: durability comes from the WAL alone.
        sink = EdgeSink(collection="c", path=path, flush_interval_seconds=3600)
        await sink.ensure_collection(dim)
        rng = np.random.default_rng(11)
        for start in range(0, n, 256):
            vectors = rng.standard_normal((min(256, n - start), dim)).astype(np.float32)
            points = [Point(str(uuid.UUID(int=start + i + 1)), v, {"i": start + i}) for i, v in enumerate(vectors)]
            await sink._call(sink.upsert_points, points, ())  # as support.put_points
        print("done", flush=True)
        time.sleep(120)  # never closes: the parent SIGKILLs us

    asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
    """
)


async def test_edge_upserts_survive_sigkill(tmp_path):
    n = 3000
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path), str(n), str(DIM)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "done"
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=10)
    assert child.returncode == -signal.SIGKILL

    sink = EdgeSink(collection="c", path=str(tmp_path))
    try:
        await sink.ensure_collection(DIM)
        assert await sink.count() == n
        last = str(uuid.UUID(int=n))
        assert (await retrieve(sink, [last]))[last][1] == {"i": n - 1}
    finally:
        await sink.close()


async def test_payload_indexes_on_the_edge_engine_id_chunk_index_and_configured_fields(tmp_path):
    """Filters on `id` and `chunk_index` (deletes, chunk replacement) and configured metadata fields are indexed."""
    import qdrant_edge as qe

    from processors.sink import parse_payload_indexes

    sink = EdgeSink(collection="c", path=str(tmp_path), payload_indexes=parse_payload_indexes("metadata.lang:keyword,metadata.ts:integer"))
    try:
        await sink.ensure_collection(DIM)
        await put_points(sink, [Point(id=p.id, vector=p.vector, payload={"id": f"d{i}", "chunk_index": 0, "metadata": {"lang": "en" if i % 2 else "de", "ts": i}})
                           for i, p in enumerate(points(10))])
        schema = await sink._call(lambda: sink._open().info().payload_schema)
        assert {"id", "chunk_index", "metadata.lang", "metadata.ts"} <= set(schema)
        english = qe.Filter(must=[qe.FieldCondition(key="metadata.lang", match=qe.MatchValue("en"))])
        assert await sink._call(lambda: sink._open().count(qe.CountRequest(filter=english))) == 5
    finally:
        await sink.close()
    with pytest.raises(ValueError, match="field:kind"):
        parse_payload_indexes("metadata.lang")
