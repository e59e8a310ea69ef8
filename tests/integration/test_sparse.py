"""BM25 sparse vectors at ingest and hybrid search, on every engine, with the real model.

The pipeline (real bundled model, real chunking) writes into qdrant-edge, qdrant-client's
in-memory engine and its sqlite path store with EMBEDWORKER_SPARSE=bm25; the tests read back
what the engines hold and what they answer: each chunk point carries the BM25 vector of its own
text (the same token ids on every engine), a rare word finds its document's chunk by sparse
search, hybrid search is RRF (k = 60) of the dense and sparse ranks, and a dense-only collection
opened with sparse on stops start-up with one line.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import sys
from pathlib import Path

import orjson
import pytest

from processors.edge_sink import EdgeSink
from processors.pipeline import Pipeline
from processors.errors import SinkConfigError
from processors.sink import QdrantSink
from processors.sparse import RRF_K, Bm25Encoder
from schemas import InputEvent, normalize_text
from streams import cli
from streams.commands.search import query_sink
from streams.config import ConfigError, load_settings, markdown_table

ROOT = Path(__file__).resolve().parents[2]
KINDS = ["edge", "qdrant-memory", "qdrant-path"]

# A long document (several chunks of the model's 256 tokens); the rare word sits in its last paragraph only.
_FILLER = " ".join(
    f"Paragraph {i} of the harbour log notes the tide, the wind from the west and the boats that came in before noon."
    for i in range(40)
)
LONG = f"{_FILLER}\n\nThe night watch was kept by the keeper Quillfeather, who logged the fog horn every hour."
DOCS = {
    "harbour": LONG,
    "refund": "I was charged twice for the same order and would like a refund.",
    "snow": "The national weather service warned of heavy snow in the mountains.",
    "router": "Error E4417 appears on the router after every firmware update.",
    "rice": "Toast the rice in olive oil before adding the stock a ladle at a time.",
}


def make(kind: str, path: Path, sparse: str = "bm25", collection: str = "c") -> EdgeSink | QdrantSink:
    if kind == "edge":
        return EdgeSink(collection=collection, path=str(path), sparse=sparse)
    if kind == "qdrant-path":
        return QdrantSink(collection=collection, path=str(path), sparse=sparse)
    return QdrantSink(collection=collection, sparse=sparse)


async def fill(sink: EdgeSink | QdrantSink, embedder, docs: dict[str, str] = DOCS) -> None:
    pipeline = Pipeline(embedder=embedder, sink=sink)
    await pipeline.start()
    try:
        outcomes = await pipeline.process([InputEvent(id=i, text=t) for i, t in docs.items()])
        assert all(o.result is not None for o in outcomes), outcomes
    finally:
        await pipeline.close()


@pytest.fixture(params=KINDS)
def kind(request) -> str:
    return request.param


async def test_every_chunk_point_carries_the_bm25_vector_of_its_own_text(kind, tmp_path, embedder):
    sink = make(kind, tmp_path)
    try:
        await fill(sink, embedder)
        assert await sink.has_sparse()
        stored = await sink.points()
        harbour = sorted((p for p in stored if p.payload["id"] == "harbour"), key=lambda p: p.payload["chunk_index"])
        assert len(harbour) >= 3, "the long document must be stored as several chunks"
        assert len(stored) == len(harbour) + len(DOCS) - 1
        encoder = Bm25Encoder()  # the tokenizer the search side uses: same ids, whichever engine stored them
        for point in stored:
            text = normalize_text(DOCS[point.payload["id"]])[point.payload["chunk_start"]:point.payload["chunk_end"]]
            (expected,) = encoder.documents([text])
            assert point.sparse is not None and len(point.sparse) > 0
            assert point.sparse.indices == expected.indices
            assert point.sparse.values == pytest.approx(expected.values, rel=1e-6)
            assert point.vector is not None and point.vector.shape == (embedder.dim,)
        # Per chunk, not per document: only the last chunk holds the rare word's token.
        (rare,) = encoder.query("Quillfeather").indices
        assert [rare in p.sparse.indices for p in harbour] == [False] * (len(harbour) - 1) + [True]
    finally:
        await sink.close()


async def test_a_rare_word_finds_its_document_by_sparse_search(kind, tmp_path, embedder):
    sink = make(kind, tmp_path)
    try:
        await fill(sink, embedder)
        encoder = Bm25Encoder()
        hits = await sink.search_sparse(encoder.query("Quillfeather"), limit=5)
        # Only the chunk holding the word matches it at all: BM25 scores nothing else.
        assert [(h.payload["id"], h.payload["chunk_index"]) for h in hits] == [("harbour", hits[0].payload["chunk_count"] - 1)]
        (code,) = await query_sink(sink, "E4417", limit=1, mode="sparse", encoder=encoder)
        assert code.payload["id"] == "router"
        assert await sink.search_sparse(encoder.query("the of and"), limit=5) == []  # stopwords only: no token
        # Hybrid keeps the keyword hit on top and returns one chunk per document.
        hybrid = await query_sink(sink, "who was the keeper Quillfeather", limit=5, mode="hybrid", embedder=embedder, encoder=encoder)
        assert hybrid[0].payload["id"] == "harbour"
        assert len({h.payload["id"] for h in hybrid}) == len(hybrid) == len(DOCS)
    finally:
        await sink.close()


async def test_bm25_scores_carry_the_engines_idf_and_agree_across_engines(tmp_path, embedder):
    sinks = {kind: make(kind, tmp_path / kind) for kind in KINDS}
    try:
        for sink in sinks.values():
            await fill(sink, embedder)
        query = Bm25Encoder().query("heavy snow in the harbour log")
        # By id: chunks of the long document tie, and engines order ties differently.
        answers = {kind: {h.id: h.score for h in await sink.search_sparse(query, limit=20)} for kind, sink in sinks.items()}
        reference = answers["edge"]
        assert len(reference) >= 3
        for kind, answer in answers.items():
            assert answer == pytest.approx(reference, rel=1e-5), kind
        # The score is the stored term weight times the engine's IDF, ln((N - df + 0.5) / (df + 0.5) + 1):
        # without Modifier.IDF it would be the weight alone.
        sink = sinks["qdrant-memory"]
        stored = await sink.points()
        (token,) = Bm25Encoder().query("Quillfeather").indices
        holders = [p for p in stored if token in p.sparse.indices]
        (hit,) = await sink.search_sparse(Bm25Encoder().query("Quillfeather"), limit=5)
        weight = holders[0].sparse.values[holders[0].sparse.indices.index(token)]
        idf = math.log((len(stored) - len(holders) + 0.5) / (len(holders) + 0.5) + 1)
        assert len(holders) == 1 and hit.score == pytest.approx(weight * idf, rel=1e-5)
    finally:
        for sink in sinks.values():
            await sink.close()


async def test_hybrid_search_is_reciprocal_rank_fusion_of_the_dense_and_sparse_ranks(kind, tmp_path, embedder):
    sink = make(kind, tmp_path)
    try:
        await fill(sink, embedder)
        total = await sink.count()
        # Words of two short documents only: no ties in the sparse list (tied chunks could swap ranks between queries).
        query = "heavy snow, and a refund for my order"
        vector = embedder.embed([query]).vectors[0]
        sparse = Bm25Encoder().query(query)
        dense_ids = [h.id for h in await sink.search(vector, limit=total)]
        sparse_ids = [h.id for h in await sink.search_sparse(sparse, limit=total)]
        assert len(dense_ids) == total and 0 < len(sparse_ids) < total  # both lists count, and they differ
        for k in (RRF_K, 2):  # the shipped constant, and the one the bench compares it with
            expected = {pid: 0.0 for pid in dense_ids}
            for ranking in (dense_ids, sparse_ids):
                for rank, pid in enumerate(ranking):
                    expected[pid] += 1.0 / (k + rank)
            hybrid = await (sink.search_hybrid(vector, sparse, limit=total) if k == RRF_K else
                            sink.search_hybrid(vector, sparse, limit=total, k=k))
            assert {h.id for h in hybrid} == set(expected)
            for hit in hybrid:
                assert hit.score == pytest.approx(expected[hit.id], rel=1e-5)
            assert [h.score for h in hybrid] == sorted((h.score for h in hybrid), reverse=True)
    finally:
        await sink.close()


@pytest.mark.parametrize("kind", ["edge", "qdrant-path"])
async def test_a_dense_only_collection_opened_with_sparse_on_is_a_one_line_start_up_error(kind, tmp_path, embedder, caplog):
    dense_only = make(kind, tmp_path, sparse="off")
    await dense_only.ensure_collection(embedder.dim)
    assert not await dense_only.has_sparse()
    await dense_only.close()

    sink = make(kind, tmp_path, sparse="bm25")
    try:
        with pytest.raises(SinkConfigError) as raised:
            await Pipeline(embedder=embedder, sink=sink).start()
        message = str(raised.value)
        assert "\n" not in message and "no 'bm25' sparse vector" in message
        assert "EMBEDWORKER_SPARSE=bm25 embedworker reembed" in message and "--from-collection c" in message
        assert await sink.count() == 0
    finally:
        await sink.close()

    # The other way round is allowed (a worker not yet switched on), with a warning that says what it costs.
    sparse_collection = make(kind, tmp_path, sparse="bm25", collection="s")
    await sparse_collection.ensure_collection(embedder.dim)
    await sparse_collection.close()
    plain = make(kind, tmp_path, sparse="off", collection="s")
    try:
        with caplog.at_level(logging.WARNING, logger="processors.sink"):
            await plain.ensure_collection(embedder.dim)
        assert any("EMBEDWORKER_SPARSE=off" in r.getMessage() for r in caplog.records)
    finally:
        await plain.close()


def test_sparse_without_qdrant_edge_names_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "qdrant_edge", None)  # `import qdrant_edge` now raises ImportError
    with pytest.raises(SinkConfigError) as raised:
        QdrantSink(collection="c", sparse="bm25")
    assert "pip install 'embedworker[sparse]'" in str(raised.value) and "\n" not in str(raised.value)
    QdrantSink(collection="c")  # dense only needs no qdrant-edge


def test_the_sparse_setting_and_its_readme_row():
    assert load_settings({}, environ={}).sparse == "off"
    assert load_settings({}, environ={"EMBEDWORKER_SPARSE": "bm25"}).sparse == "bm25"
    with pytest.raises(ConfigError, match="EMBEDWORKER_SPARSE"):
        load_settings({}, environ={"EMBEDWORKER_SPARSE": "splade"})
    (row,) = [line for line in markdown_table().splitlines() if "`EMBEDWORKER_SPARSE`" in line]
    assert row in (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")


# ---- the command line --------------------------------------------------------------------------


async def run_cli(capsys, monkeypatch, *argv: str) -> tuple[int, str, str]:
    """`embedworker ARGV` in this process, on a thread (the CLI runs its own event loop)."""
    def call() -> int:
        try:
            return cli.main([str(a) for a in argv])
        except SystemExit as exc:
            return exc.code if isinstance(exc.code, int) else 1

    for name in [n for n in os.environ if n.startswith("EMBEDWORKER_")]:
        monkeypatch.delenv(name)
    code = await asyncio.to_thread(call)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


async def test_search_sparse_and_hybrid_on_the_command_line_and_reembed_to_switch_on(tmp_path, embedder, capsys, monkeypatch):
    store = tmp_path / "store"
    dense = EdgeSink(collection="dense", path=str(store))  # a collection from before EMBEDWORKER_SPARSE
    try:
        await fill(dense, embedder)
    finally:
        await dense.close()
    where = ["--qdrant-path", store]

    code, _, err = await run_cli(capsys, monkeypatch, "search", "Quillfeather", "--hybrid", "--collection", "dense", *where)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1 and "has no BM25 sparse vectors" in lines[0] and "Traceback" not in err

    # What the start-up error advises: re-embed into a new collection with sparse on.
    code, out, err = await run_cli(capsys, monkeypatch, "reembed", "--model", "all-MiniLM-L6-v2", "--from-collection", "dense",
                                   "--target-collection", "hybrid", "--sparse", "bm25", "--collection", "dense", *where)
    assert code == 0, err
    assert f"re-embedded {len(DOCS)} texts" in out

    code, out, err = await run_cli(capsys, monkeypatch, "search", "Quillfeather", "--sparse", "--json", "--collection", "hybrid", *where)
    assert code == 0, err
    hits = orjson.loads(out)
    assert [h["id"] for h in hits] == ["harbour"] and hits[0]["payload"]["chunk_index"] > 0

    code, out, err = await run_cli(capsys, monkeypatch, "search", "what did the keeper Quillfeather log", "--hybrid", "--limit", "3",
                                   "--collection", "hybrid", *where)
    assert code == 0, err
    rows = out.strip().splitlines()
    assert len(rows) == 3 and rows[0].split("  ")[1].startswith("harbour [chunk ")
    assert 0 < float(rows[0].split()[0]) <= 2 / RRF_K  # an RRF score, not a cosine

    code, out, err = await run_cli(capsys, monkeypatch, "search", "what did the keeper Quillfeather log", "--hybrid", "--rrf-k", "2",
                                   "--json", "--collection", "hybrid", *where)
    assert code == 0, err
    top = orjson.loads(out)[0]
    assert top["id"] == "harbour" and 2 / RRF_K < top["score"] <= 2 / 2  # the constant reached the engine

    code, out, err = await run_cli(capsys, monkeypatch, "search", "zzzqqq", "--sparse", "--collection", "hybrid", *where)
    assert code == 0 and "matches a keyword of the query" in out
