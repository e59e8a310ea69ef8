"""`python -m bench.store_compare`: the embedded vector stores side by side.

For qdrant-client local `:memory:`, qdrant-client local `path=` (sqlite) and EdgeSink
(qdrant-edge), each in a fresh subprocess (so RSS is its own):
- upsert throughput through the async sink (points/s; batches of 256 normalized 384-d float32
  vectors with a ~200-byte payload; 20,000 points; median of 3 runs on fresh stores);
- the event loop's max scheduling delay meanwhile (a coroutine ticks every 5 ms; the sink's
  calls run on its own thread) and, for contrast, with the same engine calls made inline;
- query latency (p50/p95 of 200 searches through the sink; for edge also after optimize());
- RSS growth for one store of 20,000 points; reopen time of a store of 20,000 points.

Writes bench/results/store_compare.json and prints a table, compared with the model's speed
(~100-400 texts/s on this CPU, FINDINGS.md).

    python -m bench.store_compare [--points 20000] [--repeat 3] [--path-repeat 1] [--stores memory,path,edge]

The sqlite `path=` store commits per point (an fsync each), so it gets --path-repeat runs
(default 1: ~3 minutes for 20,000 points on this disk) instead of --repeat.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results" / "store_compare.json"
DIM, BATCH, QUERIES, TICK = 384, 256, 200, 0.005
MODEL_TEXTS_PER_SECOND = (100, 400)  # FINDINGS.md: the model on this CPU
STORES = {
    "memory": "qdrant-client local :memory:",
    "path": "qdrant-client local path= (sqlite)",
    "edge": "EdgeSink (qdrant-edge)",
}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def make_data(n: int, seed: int = 0) -> tuple[list[Any], np.ndarray]:
    from processors.sink import Point

    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((n, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    filler = "lorem ipsum dolor sit amet " * 6
    points = [
        Point(
            id=str(uuid.UUID(int=i + 1)),
            vector=vectors[i],
            payload={"id": f"evt-{i:08d}", "text": filler[:120] + f" #{i}", "model_version": "all-MiniLM-L6-v2@abc123",
                     "metadata": {"source": "bench", "n": i}},
        )
        for i in range(n)
    ]
    return points, vectors


def open_sink(store: str, directory: str) -> Any:
    from processors.edge_sink import EdgeSink
    from processors.sink import QdrantSink

    if store == "memory":
        return QdrantSink(collection="bench")
    if store == "path":
        return QdrantSink(collection="bench", path=directory)
    return EdgeSink(collection="bench", path=directory)


class LagMonitor:
    """Ticks every 5 ms; the max delay beyond 5 ms is how long the loop was blocked."""

    def __init__(self) -> None:
        self.lags: list[float] = []
        self._task: asyncio.Task | None = None

    async def _run(self) -> None:
        while True:
            start = time.perf_counter()
            await asyncio.sleep(TICK)
            self.lags.append(time.perf_counter() - start - TICK)

    def __enter__(self) -> "LagMonitor":
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc: Any) -> None:
        assert self._task is not None
        self._task.cancel()

    def summary(self) -> dict[str, float]:
        lags = sorted(self.lags) or [0.0]
        return {"max_lag_ms": round(lags[-1] * 1000, 2), "p99_lag_ms": round(lags[int(0.99 * (len(lags) - 1))] * 1000, 2),
                "ticks": len(self.lags)}


async def upsert_batch(sink: Any, points: list[Any]) -> None:
    """The engine's bare upsert (the `ChunkEngine` primitive), on the sink's thread."""
    await sink._call(sink.upsert_points, points, ())


async def upsert_all(sink: Any, points: list[Any]) -> float:
    started = time.perf_counter()
    for start in range(0, len(points), BATCH):
        await upsert_batch(sink, points[start : start + BATCH])
    return time.perf_counter() - started


def inline_upsert(sink: Any, points: list[Any]) -> None:
    """The same engine call, made on the loop's thread (what a sink without its thread would do)."""
    if hasattr(sink, "_client"):
        from qdrant_client import models

        structs = [models.PointStruct(id=p.id, vector=p.vector.tolist(), payload=p.payload) for p in points]
        sink._client.upsert(sink.collection, points=structs, wait=True)
    else:
        import qdrant_edge as qe

        shard = sink._shared.shards[sink.collection]
        shard.update(qe.UpdateOperation.upsert_points([qe.Point(p.id, p.vector.tolist(), p.payload) for p in points]))


async def query_latency(sink: Any, queries: np.ndarray) -> dict[str, float]:
    times = []
    for q in queries:
        t = time.perf_counter()
        hits = await sink.search(q, limit=5)
        times.append(time.perf_counter() - t)
        assert hits
    times.sort()
    return {"p50_ms": round(statistics.median(times) * 1000, 3), "p95_ms": round(times[int(0.95 * (len(times) - 1))] * 1000, 3)}


async def measure(store: str, n: int, repeat: int) -> dict[str, Any]:
    points, vectors = make_data(n)
    queries = vectors[np.random.default_rng(1).choice(n, QUERIES)] + 0.01
    gc.collect()
    base_rss = rss_bytes()
    result: dict[str, Any] = {"store": store, "label": STORES[store], "points": n, "batch": BATCH, "dim": DIM}
    runs, lags = [], []
    for run in range(repeat):
        directory = tempfile.mkdtemp(prefix=f"store-{store}-")
        sink = open_sink(store, directory)
        try:
            await sink.ensure_collection(DIM)
            with LagMonitor() as monitor:
                seconds = await upsert_all(sink, points)
            runs.append(n / seconds)
            lags.append(monitor.summary())
            assert await sink.count() == n
            if run == 0:
                gc.collect()
                result["rss_growth_mib"] = round((rss_bytes() - base_rss) / 2**20, 1)
                result["disk_mib"] = round(_du(directory) / 2**20, 1) if store != "memory" else 0.0
                result["query"] = await query_latency(sink, queries)
                if store == "edge":
                    t = time.perf_counter()
                    await sink.optimize()
                    result["optimize_seconds"] = round(time.perf_counter() - t, 2)
                    result["query_after_optimize"] = await query_latency(sink, queries)
                    # Inline (no thread) for contrast, and the cost of a flush per batch.
                    t = time.perf_counter()
                    for start in range(0, min(n, 2560), BATCH):
                        await upsert_batch(sink, points[start : start + BATCH])
                        await sink.flush()
                    result["upsert_plus_flush_per_batch_points_per_second"] = round(min(n, 2560) / (time.perf_counter() - t))
                with LagMonitor() as monitor:
                    for start in range(0, min(n, 2560), BATCH):
                        inline_upsert(sink, points[start : start + BATCH])
                        await asyncio.sleep(0)
                result["inline_loop_lag"] = monitor.summary()
        finally:
            await sink.close()
        if store != "memory" and run == 0:
            t = time.perf_counter()
            sink = open_sink(store, directory)
            try:
                await sink.ensure_collection(DIM)
                assert await sink.count() == n
                result["reopen_seconds"] = round(time.perf_counter() - t, 2)
            finally:
                await sink.close()
        shutil.rmtree(directory, ignore_errors=True)
        gc.collect()
    result["upsert_runs_points_per_second"] = [round(r) for r in runs]
    result["upsert_points_per_second"] = round(statistics.median(runs))
    result["loop_lag_during_upserts"] = {
        "max_lag_ms": max(l["max_lag_ms"] for l in lags),
        "p99_lag_ms": round(statistics.median(l["p99_lag_ms"] for l in lags), 2),
    }
    low, high = MODEL_TEXTS_PER_SECOND
    result["vs_model"] = round(result["upsert_points_per_second"] / high, 1)
    result["faster_than_model"] = result["upsert_points_per_second"] > high
    return result


def _du(directory: str) -> int:
    total = 0
    for root, _, files in os.walk(directory):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                pass
    return total


def table(results: list[dict[str, Any]]) -> str:
    header = ("store", "upsert pts/s (runs)", "x model max", "loop max lag ms", "inline max lag ms", "query p50 ms",
              "RSS +MiB", "disk MiB", "reopen s")
    rows = [header]
    for r in results:
        q = f"{r['query']['p50_ms']:.2f}"
        if "query_after_optimize" in r:
            q += f" (HNSW {r['query_after_optimize']['p50_ms']:.2f})"
        rows.append((
            r["label"],
            f"{r['upsert_points_per_second']:,} ({', '.join(f'{x:,}' for x in r['upsert_runs_points_per_second'])})",
            f"{r['vs_model']}x {'faster' if r['faster_than_model'] else 'NOT faster'}",
            f"{r['loop_lag_during_upserts']['max_lag_ms']:.1f}",
            f"{r['inline_loop_lag']['max_lag_ms']:.1f}",
            q,
            f"{r['rss_growth_mib']:.0f}",
            f"{r['disk_mib']:.0f}",
            f"{r.get('reopen_seconds', '-')}",
        ))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(header))]
    lines = [" | ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--stores", default="memory,path,edge")
    parser.add_argument("--path-repeat", type=int, default=1,
                        help="runs for the sqlite path= store, which commits (fsyncs) per point: ~100-700 points/s "
                             "depending on the disk, so 20,000 points take minutes per run")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--one", choices=list(STORES), help=argparse.SUPPRESS)  # child mode: print one JSON result
    args = parser.parse_args(argv)

    if args.one:
        import warnings

        warnings.simplefilter("ignore")
        print(json.dumps(asyncio.run(measure(args.one, args.points, args.repeat))))
        return 0

    results = []
    for store in [s.strip() for s in args.stores.split(",") if s.strip()]:
        print(f"measuring {STORES[store]} ...", file=sys.stderr, flush=True)
        started = time.perf_counter()
        child = subprocess.run(
            [sys.executable, "-m", "bench.store_compare", "--one", store, "--points", str(args.points), "--repeat", str(args.path_repeat if store == "path" else args.repeat)],
            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
        )
        if child.returncode != 0:
            print(child.stderr, file=sys.stderr)
            return 1
        result = json.loads(child.stdout.strip().splitlines()[-1])
        result["wall_seconds"] = round(time.perf_counter() - started, 1)
        results.append(result)

    low, high = MODEL_TEXTS_PER_SECOND
    document = {
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
        "model_texts_per_second": {"low": low, "high": high, "source": "FINDINGS.md"},
        "settings": {"points": args.points, "repeat": args.repeat, "path_repeat": args.path_repeat, "batch": BATCH, "dim": DIM, "queries": QUERIES,
                     "tick_ms": TICK * 1000},
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    print(table(results))
    print(f"\nmodel: ~{low}-{high} texts/s; 'x model max' = store upsert rate / {high}. Wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
