"""`reembed --from-collection` rebuilds a document only from a complete, consistent chunk set.

The source collection is written while the copy may run: a paged scroll can see v2's chunks
0-1 beside v1's chunks 2-4. Such a set is skipped and counted, never joined into a text that
never existed. Real engines (qdrant-client local and qdrant-edge), crafted points.
"""

from __future__ import annotations

import asyncio
import uuid

import numpy as np
import pytest

from support import run_cli
from processors.sink import Point
from schemas import content_hash, point_id
from streams.config import load_settings
from streams.commands.reembed import reembed
from support import put_points

MODEL = "all-MiniLM-L6-v2"
DIM = 384

V1 = (
    "The first paragraph talks about the weather in the mountains. "
    "The second paragraph is about a refund for an order charged twice. "
    "The third paragraph explains how to rotate credentials safely."
)
# v2: two same-length edits, so both versions chunk at the same offsets.
V2 = V1.replace("weather in the mountains", "forecast on the mountain").replace("charged twice", "charged again")
assert len(V2) == len(V1) and V2 != V1


def _spans(text: str, size: int, overlap: int) -> list[tuple[int, int]]:
    """Character spans the way chunking lays them out: each chunk repeats the end of the previous one."""
    spans, start = [], 0
    while True:
        end = min(start + size, len(text))
        spans.append((start, end))
        if end >= len(text):
            return spans
        start = end - overlap


def _payload(doc_id: str, index: int, count: int, text: str, start: int, end: int, **extra) -> dict:
    payload = {
        "id": doc_id, "chunk_index": index, "chunk_count": count, "chunk_start": start, "chunk_end": end,
        "metadata": {"doc": doc_id}, "content_hash": content_hash(MODEL, text[start:end] if count > 1 else text),
        "model": MODEL, "truncated": False, "text": text[start:end] if count > 1 else text,
    }
    payload.update(extra)
    return payload


def _chunks(doc_id: str, text: str, size: int = 70, overlap: int = 15) -> list[dict]:
    spans = _spans(text, size, overlap)
    return [_payload(doc_id, i, len(spans), text, s, e) for i, (s, e) in enumerate(spans)]


def _vector(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def _points(payloads: list[dict], *, point_ids: list[str] | None = None) -> list[Point]:
    ids = point_ids or [point_id(p["id"], p["chunk_index"]) for p in payloads]
    return [Point(id=pid, vector=_vector(n), payload=p) for n, (pid, p) in enumerate(zip(ids, payloads))]


def _sink(engine: str, collection: str, path: str):
    if engine == "edge":
        from processors.edge_sink import EdgeSink

        return EdgeSink(collection=collection, path=path)
    from processors.sink import QdrantSink

    return QdrantSink(collection=collection, path=path)


async def _store(engine: str, path: str, points: list[Point], collection: str = "src") -> None:
    sink = _sink(engine, collection, path)
    try:
        await sink.ensure_collection(DIM)
        for i in range(0, len(points), 500):
            await put_points(sink, points[i:i + 500])
    finally:
        await sink.close()  # one client per path: reembed opens it next


async def _reembed(engine: str, path: str, embedder):
    settings = load_settings({"qdrant_path": path, "qdrant_engine": engine, "collection": "src"}, environ={})
    report = await reembed(settings, model=MODEL, from_collection="src", target="dst", embedder=embedder)
    sink = _sink(engine, "dst", path)
    try:
        written: dict[str, list[dict]] = {}
        for point in await sink.points(with_vectors=False):
            written.setdefault(point.payload["id"], []).append(point.payload)
    finally:
        await sink.close()
    return report, written


ENGINES = pytest.mark.parametrize("engine", ["local", "edge"])


@ENGINES
async def test_a_mix_of_two_versions_is_skipped_and_counted(engine, tmp_path, embedder):
    v1 = _chunks("mixed", V1, size=40, overlap=10)  # 7 chunks
    v2 = _chunks("mixed", V2, size=50, overlap=10)  # 5 chunks
    assert (len(v1), len(v2)) == (7, 5)
    # The scroll saw v2's chunks 0-1 (written meanwhile) and v1's chunks 2-6: joined, they give
    # v2's first edit with v1's "charged twice", a text that never existed.
    mixed = v2[:2] + v1[2:]
    await _store(engine, str(tmp_path), _points(mixed + _chunks("fine", V1) + [_payload("single", 0, 1, "  One chunk, as sent.  ", 0, 19)]))

    report, written = await _reembed(engine, str(tmp_path), embedder)

    assert "mixed" not in written, written.get("mixed", [{}])[0].get("text")
    assert report.inconsistent == 1 and report.inconsistent_ids == ["'mixed'"]
    assert set(written) == {"fine", "single"} and report.embedded == 2 and report.skipped == 0


@ENGINES
async def test_every_kind_of_inconsistent_set_is_skipped(engine, tmp_path, embedder):
    same_count_v1 = _chunks("overlap", V1)
    same_count_v2 = _chunks("overlap", V2)
    assert len(same_count_v1) == len(same_count_v2) == 4
    overlap_mix = same_count_v2[:2] + same_count_v1[2:]  # same count and spans; chunk 1 and 2 disagree on their overlap
    assert overlap_mix[1]["text"][-15:] != overlap_mix[2]["text"][:15]
    missing = [p for p in _chunks("missing", V1) if p["chunk_index"] != 1]  # chunk 1 of 3 gone
    only_first = _chunks("only-first", V1)[:1]  # chunk_count 3, one chunk
    span_lie = _chunks("span-lie", V1)
    span_lie[1] = {**span_lie[1], "chunk_end": span_lie[1]["chunk_end"] + 5}  # span and text disagree
    late_start = _chunks("late-start", V1)
    late_start[0] = {**late_start[0], "chunk_start": 3, "chunk_end": late_start[0]["chunk_end"] + 3}
    meta = _chunks("meta", V1)
    meta[3] = {**meta[3], "metadata": {"doc": "meta", "edited": True}}  # same text, another version's metadata
    duplicate = _chunks("dup\nid", V1)
    points = _points(overlap_mix + missing + only_first + span_lie + late_start + meta + duplicate)
    # The same chunk index twice (another point id carrying the same payload id and index).
    points.append(Point(id=str(uuid.uuid4()), vector=_vector(99), payload={**duplicate[1], "text": duplicate[1]["text"].upper()}))
    points += _points(_chunks("fine", V2))
    await _store(engine, str(tmp_path), points)

    report, written = await _reembed(engine, str(tmp_path), embedder)

    assert set(written) == {"fine"}
    expected = ["overlap", "missing", "only-first", "span-lie", "late-start", "meta", "dup\nid"]
    assert report.inconsistent == len(expected)
    assert sorted(report.inconsistent_ids) == sorted(repr(doc_id) for doc_id in expected)


@ENGINES
async def test_a_consistent_multi_chunk_document_is_rebuilt_exactly(engine, tmp_path, embedder):
    chunks = _chunks("doc", V1, size=50, overlap=12)
    assert len(chunks) >= 4
    await _store(engine, str(tmp_path), _points(chunks + [_payload("one", 0, 1, "\tA text kept as sent. ", 0, 20)]))

    report, written = await _reembed(engine, str(tmp_path), embedder)

    assert report.inconsistent == 0 and report.inconsistent_ids == [] and report.embedded == 2
    assert [p["text"] for p in written["doc"]] == [V1]  # short enough for one chunk of the model
    assert written["doc"][0]["metadata"] == {"doc": "doc"}
    assert [p["text"] for p in written["one"]] == ["\tA text kept as sent. "]


def test_rebuild_rules():
    from streams.commands.reembed import document_text, rebuild_document

    assert rebuild_document(_chunks("d", V1)) == (V1, None, False)
    assert rebuild_document(list(reversed(_chunks("d", V1)))).text == V1
    assert document_text(_chunks("d", V1)) == V1 and document_text(_chunks("d", V1)[:2]) is None
    # Adjacent spans (no overlap) are fine.
    adjacent = [_payload("d", 0, 2, V1, 0, 50), _payload("d", 1, 2, V1, 50, len(V1))]
    assert rebuild_document(adjacent) == (V1, None, False)
    # A gap between two spans (chunk_overlap_tokens=0 leaves the whitespace between tokens out)
    # is text no payload holds: not rebuilt, but not a mix of versions either.
    gap = rebuild_document([_payload("d", 0, 2, V1, 0, 50), _payload("d", 1, 2, V1, 51, len(V1))])
    assert gap.text is None and not gap.inconsistent and "gap" in gap.problem
    # A legacy one-chunk point without chunk fields is a one-chunk document; no text, nothing to rebuild.
    assert rebuild_document([{"id": "d", "text": "x"}]) == ("x", None, False)
    assert rebuild_document([{"id": "d", "chunk_index": 0, "chunk_count": 1}]).inconsistent is False
    for broken in (
        _chunks("d", V1)[:2],
        _chunks("d", V1) + _chunks("d", V1)[1:2],
        [{**p, "chunk_count": 5} if p["chunk_index"] == 2 else p for p in _chunks("d", V1)],
        _chunks("d", V2)[:2] + _chunks("d", V1)[2:],
        [{**p, "chunk_index": "1"} if p["chunk_index"] == 1 else p for p in _chunks("d", V1)],
    ):
        rebuilt = rebuild_document(broken)
        assert rebuilt.text is None and rebuilt.inconsistent and rebuilt.problem, broken


async def test_chunks_on_different_scroll_pages_are_grouped(tmp_path, embedder):
    """More than a scroll page (1000 points): one document's chunks arrive on two pages."""
    chunks = _chunks("paged", V1, size=20, overlap=5)
    # Fillers without stored text: skipped before embedding, so the test stays quick.
    fillers = [{"id": f"filler-{i}", "chunk_index": 0, "chunk_count": 1, "chunk_start": 0, "chunk_end": 5} for i in range(1200)]
    await _store("local", str(tmp_path), _points(chunks + fillers))
    from qdrant_client import QdrantClient

    client = QdrantClient(path=str(tmp_path))
    try:
        first_page, _ = client.scroll("src", limit=1000, with_payload=["id"])
        on_first = sum(r.payload["id"] == "paged" for r in first_page)
    finally:
        client.close()
    assert 0 < on_first < len(chunks)  # the precondition: the document straddles two pages

    report, written = await _reembed("local", str(tmp_path), embedder)

    assert [p["text"] for p in written["paged"]] == [V1]
    assert report.inconsistent == 0 and report.skipped == 1200 and report.embedded == 1


def test_the_cli_says_how_many_were_inconsistent_and_how_to_catch_up(tmp_path, capsys, clean_cli_state):
    mixed = _chunks("mixed", V2)[:2] + _chunks("mixed", V1)[2:]
    asyncio.run(_store("local", str(tmp_path), _points(mixed + _chunks("fine", V1))))

    code, out, err = run_cli(
        capsys, "reembed", "--model", MODEL, "--from-collection", "src", "--target-collection", "dst",
        "--qdrant-path", str(tmp_path), "--qdrant-engine", "local",
    )

    assert code == 0, err
    assert "re-embedded 1 texts" in out
    assert "1 documents skipped as inconsistent (written while the copy ran): catch up with --from-topic, or run reembed again" in out
    assert "inconsistent documents: 'mixed'" in err
