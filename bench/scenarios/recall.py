"""Scenario `recall`: recall@10 of dense, sparse (BM25) and hybrid search on a labelled query set.

The demo corpus's texts (`streams.corpus.texts`, as distractors) and 107 written documents
(`bench/data/recall_corpus.jsonl`) go through the Worker with EMBEDWORKER_SPARSE=bm25, once
into qdrant-edge and once into qdrant-client's in-memory engine. The written documents: 41
answers (names, order and error codes, rare words; three long ones stored as several chunks,
the word a query wants in a later chunk), 30 near misses (the same kind of text with another
name or code) and three families of twelve tickets that differ from an answer only in the
order number, error code or tracking number. Then each query of
`bench/data/recall_queries.jsonl` (30: keyword, paraphrase and mixed, each with the ids that
should come back) is searched the way `embedworker search` does it
(`streams.commands.search.query_sink`: best chunk per document, top 10) in each mode, and in
a what-if mode, hybrid with RRF k = 2. recall@10 = share of a query's relevant ids in its top
10, averaged over queries; MRR from the first relevant rank. A third ingest, sparse off, into
qdrant-edge gives what the sparse vectors cost at write time (full runs only).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from bench.common import target
from bench.harness import Context, run_worker_backlog, warm_pipeline

DATA = Path(__file__).resolve().parents[1] / "data"
K = 10
KINDS = ("keyword", "paraphrase", "mixed")
MODES = ("dense", "sparse", "hybrid")
WHATIF_K = 2
"""What-if arm: hybrid with RRF k = 2, the constant of Qdrant's plain `FusionQuery(RRF)`."""
ARMS = {"dense": ("dense", None), "sparse": ("sparse", None), "hybrid": ("hybrid", None), "hybrid_k2": ("hybrid", WHATIF_K)}
"""Reported name -> (search mode, RRF constant; None: the shipped 60)."""


def load_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_set() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The hand-written documents and the labelled queries; every relevant id must be a document."""
    documents = load_jsonl(DATA / "recall_corpus.jsonl")
    queries = load_jsonl(DATA / "recall_queries.jsonl")
    known = {d["id"] for d in documents}
    unknown = sorted({r for q in queries for r in q["relevant"]} - known)
    if unknown:
        raise ValueError(f"recall_queries.jsonl names ids not in recall_corpus.jsonl: {unknown}")
    return documents, queries


async def evaluate(sink: Any, queries: Sequence[dict[str, Any]], embedder: Any, modes: Sequence[str]) -> list[dict[str, Any]]:
    """Per query and mode: recall@K, rank of the first relevant document (1-based, None beyond K), top ids."""
    from processors.sparse import Bm25Encoder
    from streams.commands.search import query_sink

    encoder = Bm25Encoder()
    rows = []
    for q in queries:
        row: dict[str, Any] = {"id": q["id"], "kind": q["kind"], "query": q["query"], "relevant": q["relevant"]}
        for mode in modes:
            search_mode, rrf_k = ARMS[mode]
            hits = await query_sink(sink, q["query"], limit=K, mode=search_mode, embedder=embedder, encoder=encoder, rrf_k=rrf_k)
            ids = [str(h.payload.get("id", h.id)) for h in hits]
            ranks = [ids.index(r) + 1 for r in q["relevant"] if r in ids]
            row[mode] = {"recall": len(ranks) / len(q["relevant"]), "first_rank": min(ranks) if ranks else None, "top": ids}
        rows.append(row)
    return rows


async def store_facts(sink: Any) -> dict[str, Any]:
    """What was stored: points, documents, and how many points carry a sparse vector (with tokens)."""
    points = await sink.points(with_vectors=True)
    return {
        "points": len(points),
        "documents": len({p.payload.get("id") for p in points}),
        "chunked_documents": len({p.payload.get("id") for p in points if int(p.payload.get("chunk_count", 1)) > 1}),
        "points_with_sparse": sum(1 for p in points if p.sparse is not None and len(p.sparse) > 0),
    }


def means(rows: Sequence[dict[str, Any]], modes: Sequence[str]) -> dict[str, dict[str, float]]:
    """Mean recall@K per mode, by query kind and over all; MRR@K over all."""
    out: dict[str, dict[str, float]] = {}
    for mode in modes:
        entry = {kind: _mean([r[mode]["recall"] for r in rows if r["kind"] == kind]) for kind in KINDS}
        entry["all"] = _mean([r[mode]["recall"] for r in rows])
        entry["mrr"] = _mean([1 / r[mode]["first_rank"] if r[mode]["first_rank"] else 0.0 for r in rows])
        out[mode] = entry
    return out


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


async def recall(ctx: Context) -> dict[str, Any]:
    from streams import corpus
    from streams.commands.search import OVERSAMPLE

    documents, queries = load_set()
    distractors = corpus.texts(ctx.size(1000, 48), seed=11)
    texts = [d["text"] for d in documents] + distractors
    ids = [d["id"] for d in documents] + [f"demo-{i:05d}" for i in range(len(distractors))]
    await warm_pipeline(ctx)

    arms = [("edge", "edge", "bm25", tuple(ARMS)), ("memory", "memory", "bm25", tuple(ARMS))]
    if not ctx.quick:  # the write-time comparison means nothing at quick sizes
        arms.append(("edge_dense_only", "edge", "off", ("dense",)))
    runs: dict[str, dict[str, Any]] = {}
    for arm, sink_kind, sparse, modes in arms:
        async def after(sink: Any, modes: Sequence[str] = modes) -> dict[str, Any]:
            return {"facts": await store_facts(sink), "queries": await evaluate(sink, queries, ctx.embedder, modes)}

        run = await run_worker_backlog(ctx, texts, ids=ids, sink_kind=sink_kind, settings_overrides={"sparse": sparse}, after=after)
        run.pop("_embed_calls", None)
        result = run.pop("after")
        runs[arm] = {"worker": run, **result, "recall": means(result["queries"], modes)}

    edge, memory, dense_only = runs["edge"], runs["memory"], runs.get("edge_dense_only")
    pairs = [(a[m]["top"], b[m]["top"]) for a, b in zip(edge["queries"], memory["queries"]) for m in MODES]
    same_top = sum(1 for x, y in pairs if x == y)
    same_recall = sum(1 for a, b in zip(edge["queries"], memory["queries"]) for m in MODES if a[m]["recall"] == b[m]["recall"])
    r = edge["recall"]
    write_on = edge["worker"]["upsert_seconds_sum"]
    write_off = dense_only["worker"]["upsert_seconds_sum"] if dense_only else None
    targets = [
        target("hybrid_recall_at_least_dense", r["hybrid"]["all"] - r["dense"]["all"], ">=", 0.0,
               "recall@10 of hybrid minus dense, all queries (qdrant-edge)"),
        target("hybrid_recall_at_least_sparse", r["hybrid"]["all"] - r["sparse"]["all"], ">=", 0.0,
               "recall@10 of hybrid minus sparse, all queries (qdrant-edge)"),
    ]

    def cells(mode: str) -> str:
        m = r[mode]
        return (f"{m['all']:.2f} (keyword {m['keyword']:.2f}, paraphrase {m['paraphrase']:.2f}, mixed {m['mixed']:.2f}); "
                f"MRR {m['mrr']:.2f}")

    facts = edge["facts"]
    return {
        "parameters": {
            "method": __doc__.split("\n\n", 1)[1].strip(),
            "k": K,
            "queries": {kind: sum(1 for q in queries if q["kind"] == kind) for kind in KINDS},
            "labelled_documents": len(documents),
            "distractors": len(distractors),
            "stored": facts,
            "fusion": f"engine-side reciprocal rank fusion, k=60, over a dense and a sparse prefetch of {K * OVERSAMPLE} chunks each "
                      "(qdrant-edge Fusion.Rrf, qdrant-client RrfQuery); best chunk per document after fusion",
            "bm25": "qdrant_edge.Bm25(Bm25Config()) defaults: k 1.2, b 0.75, avg_len 256, English stopwords and stemmer; "
                    "IDF from the engine (Modifier.IDF)",
        },
        "repetitions": [runs],
        "medians": {"edge": edge["recall"], "memory": memory["recall"], "dense_only_edge": dense_only["recall"] if dense_only else None,
                    "write_seconds": {"sparse_on": write_on, "sparse_off": write_off}},
        "ratios": {
            "hybrid_over_dense": r["hybrid"]["all"] / r["dense"]["all"] if r["dense"]["all"] else None,
            "engines_same_top10": same_top / len(pairs),
            "write_seconds_sparse_over_dense_only": write_on / write_off if write_off else None,
        },
        "targets": targets,
        "clean_units": "n/a (not timed)",
        "table": [
            (f"recall@{K}, dense (model)", cells("dense"), "", None),
            (f"recall@{K}, sparse (BM25)", cells("sparse"), "", None),
            (f"recall@{K}, hybrid (RRF k=60)", cells("hybrid"), ">= dense, >= sparse",
             all(t["passed"] for t in targets)),
            (f"recall@{K}, what-if: hybrid with RRF k={WHATIF_K}", cells("hybrid_k2"), "", None),
            ("recall: qdrant-client :memory: vs qdrant-edge",
             f"same top 10 on {same_top}/{len(pairs)}, same recall on {same_recall}/{len(pairs)} query-modes; "
             f"hybrid {memory['recall']['hybrid']['all']:.2f}", "", None),
            ("recall: sparse vectors at ingest (qdrant-edge)",
             f"{facts['points_with_sparse']}/{facts['points']} points carry one; store write time {write_on:.2f} s"
             + (f" vs {write_off:.2f} s dense only" if write_off is not None else ""), "", None),
        ],
    }
