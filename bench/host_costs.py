"""`python -m bench.host_costs`: per-message costs of the decode step and the store's version guard.

Each figure is measured beside its baseline in the same run, and reported as a ratio:
- decode: a mapped flat event and a Debezium change event against the native event;
- hostile decode: a ~0.8 MB message of tiny nested arrays (refused before parsing) and one
  just under the container cap, against the native event;
- version guard: 256 updates a batch with versions against the same batches without, on
  qdrant-client's in-memory engine and qdrant-edge (no model: the no-I/O word embedder); and
  with the guard also as the engine's conditional upsert (what a server gets), which the
  embedded stores leave off;
- metadata-only updates: a stream of updates that change only metadata (same texts, 384-wide
  vectors as the bundled model's), with payload-only writes on against the same stream with
  them off (every update writes its vector), on both engines;
- cache writes: client time per key of one script call per batch of 256 against the pipeline of
  SETs it falls back to, and cache reads (MGET of 256) with hiredis against redis-py's Python reply
  parser (Redis at REDIS_URL, else a throwaway redis-server);
- qdrant-edge points: `Point(id, vector, payload)` with the worker's payload against none, and
  the cost of one payload value by type (what the binding's conversion charges); and the CPU a
  point costs while another thread runs Python, against alone (each failed conversion try lets
  the GIL go);
- qdrant-client points: the request of a batch as one `PointStruct` a point against one `Batch`
  (what `QdrantSink` sends to a server).

Writes <out>/host_costs.json and host_costs.png (default bench/results/tmp/) and prints the JSON. Numbers are this
machine's; the ratios are what to compare.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import orjson

ROOT = Path(__file__).resolve().parent.parent


def per_call_us(function: Callable[[], Any], calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        function()
    return (time.perf_counter() - started) / calls * 1e6


def decode_costs(calls: int) -> dict[str, Any]:
    from schemas import InvalidEvent
    from schemas.events import DEFAULT_LIMITS, _depth
    from schemas.mapping import Mapping, decode_record, parse_mapping

    native = orjson.dumps({"id": "kb-17", "text": "Reset a password. Open settings and choose security.", "metadata": {"lang": "en"}})
    flat = orjson.dumps({"doc_id": "kb-17", "title": "Reset a password", "body": "Open settings and choose security.", "lang": "en"})
    debezium = orjson.dumps({"before": None, "after": {"id": 42, "title": "Reset a password", "body": "Open settings and choose security.",
                                                       "lang": "en"}, "op": "c", "source": {"lsn": 100, "ts_ms": 1}})
    flat_mapping = parse_mapping(id_from="doc_id", text_from="title,body", metadata_from="lang")
    debezium_mapping = parse_mapping(input_format="debezium", text_from="{title}\\n\\n{body}", metadata_from="lang")

    def padded(arrays: int) -> bytes:
        return orjson.dumps({"id": "x", "text": "hello", "ignored": [[[1], [2]] for _ in range(arrays // 3)]})

    def hostile(raw: bytes) -> Callable[[], None]:
        def call() -> None:
            try:
                decode_record(raw, None, (), Mapping())
            except InvalidEvent:
                pass
        return call

    base = per_call_us(lambda: decode_record(native, None, (), Mapping()), calls)
    metadata = orjson.loads(native)["metadata"]
    costs = {
        # What the bracket-count precheck spares a native event with flat metadata (the walk it skips).
        "depth_walk_skipped_us": per_call_us(lambda: _depth(metadata, DEFAULT_LIMITS.max_depth - 1), calls),
        "native_us": base,
        "mapped_flat_us": per_call_us(lambda: decode_record(flat, None, (), flat_mapping), calls),
        "debezium_us": per_call_us(lambda: decode_record(debezium, b'{"id": 42}', (), debezium_mapping), calls),
        "refused_0_8_mb_us": per_call_us(hostile(padded(240_000)), 20),
        "under_the_cap_us": per_call_us(hostile(padded(49_800)), 20),
    }
    return {**costs, **{k.replace("_us", "_ratio"): v / base for k, v in costs.items() if k != "native_us"}}


async def guard_costs(rounds: int, batch: int) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT / "tests"))
    from doubles import WordEmbedder
    from processors.edge_sink import EdgeSink
    from processors.pipeline import Pipeline
    from processors.sink import QdrantSink
    from schemas import InputEvent, Version

    async def run(kind: str, versioned: bool, in_engine: bool = False) -> float:
        directory = tempfile.mkdtemp(prefix="embedworker-guard-")
        sink = QdrantSink(collection="g") if kind == "memory" else EdgeSink(collection="g", path=directory)
        sink.conditional_writes = in_engine
        pipeline = Pipeline(embedder=WordEmbedder(max_tokens=64), sink=sink)
        await pipeline.start()
        total = 0.0
        for r in range(rounds):
            events = [InputEvent(id=f"d{i}", text=f"text {i} round {r}") for i in range(batch)]
            versions = [Version("t/0", r * batch + i) for i in range(batch)] if versioned else None
            started = time.perf_counter()
            await pipeline.process(events, versions=versions)
            total += time.perf_counter() - started
        await pipeline.close()
        await sink.close()
        return total / rounds * 1000

    result: dict[str, Any] = {"batch": batch, "rounds": rounds}
    for kind in ("memory", "edge"):
        plain, guarded, in_engine = await run(kind, False), await run(kind, True), await run(kind, True, in_engine=True)
        result[kind] = {"unguarded_ms": plain, "guarded_ms": guarded, "ratio": guarded / plain,
                        "conditional_upsert_ms": in_engine, "conditional_upsert_ratio": in_engine / plain}
    return result


async def metadata_only_costs(rounds: int, batch: int) -> dict[str, Any]:
    """Per batch of `batch` metadata-only updates: pipeline time with payload-only writes on and off (median of paired rounds)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from doubles import WordEmbedder
    from processors.edge_sink import EdgeSink
    from processors.pipeline import Pipeline, PipelineHooks
    from processors.sink import QdrantSink
    from schemas import InputEvent, Version

    import hashlib

    import numpy as np

    from processors.embedder import Embeddings

    class WideWords(WordEmbedder):
        """The word embedder at the bundled model's width (384): vector writes cost what they do in use."""

        dim = 384

        def embed(self, texts, token_counts=None):  # type: ignore[no-untyped-def]
            seeds = [int.from_bytes(hashlib.sha256(t.encode()).digest()[:4], "little") for t in texts]
            rows = np.stack([np.random.default_rng(seed).standard_normal(self.dim) for seed in seeds]).astype(np.float32)
            return Embeddings(rows / np.linalg.norm(rows, axis=1, keepdims=True), [False] * len(texts))

    texts = [f"document {i} about resetting a password in the settings page" for i in range(batch)]

    async def open_arm(kind: str, payload_only: bool) -> tuple[Any, Any, list[int]]:
        directory = tempfile.mkdtemp(prefix="embedworker-meta-")
        sink = QdrantSink(collection="m") if kind == "memory" else EdgeSink(collection="m", path=directory)
        sink.payload_only_writes = payload_only
        kept: list[int] = []
        pipeline = Pipeline(embedder=WideWords(max_tokens=64), sink=sink, hooks=PipelineHooks(on_payload_only=kept.append))
        await pipeline.start()
        await pipeline.process([InputEvent(id=f"d{i}", text=t, metadata={"rev": 0}) for i, t in enumerate(texts)])
        return pipeline, sink, kept

    async def timed_round(pipeline: Any, r: int) -> float:
        events = [InputEvent(id=f"d{i}", text=t, metadata={"rev": r, "lang": "en"}) for i, t in enumerate(texts)]
        versions = [Version("t/0", r * batch + i) for i in range(batch)]
        started = time.perf_counter()
        await pipeline.process(events, versions=versions)
        return time.perf_counter() - started

    result: dict[str, Any] = {"batch": batch, "rounds": rounds, "dim": WideWords.dim}
    for kind in ("memory", "edge"):
        # The two arms alternate round by round, so a drift of the machine's speed hits both alike.
        full, kept = await open_arm(kind, False), await open_arm(kind, True)
        ratios, full_ms, kept_ms = [], [], []
        for r in range(1, rounds + 1):
            a, b = await timed_round(full[0], r), await timed_round(kept[0], r)
            full_ms.append(a * 1000)
            kept_ms.append(b * 1000)
            ratios.append(b / a)
        for pipeline, sink, _ in (full, kept):
            await pipeline.close()
            await sink.close()
        result[kind] = {"vector_written_ms": statistics.median(full_ms), "payload_only_ms": statistics.median(kept_ms),
                        "ratio": statistics.median(ratios), "payload_only_writes": sum(kept[2]) - 0, "updates": rounds * batch}
    return result


async def cache_write_costs(batches: int, batch: int) -> dict[str, Any]:
    """Client time per key of a cache write: one script call per batch against a pipeline of SETs (the fallback)."""
    import numpy as np

    from processors.cache import RedisCache

    url, local = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"), None
    probe = RedisCache(url=url, timeout_seconds=0.5)
    if not await probe.healthy():
        from streams.devstack import LocalRedis

        local = LocalRedis().start()
        url = local.url
    await probe.close()
    cache = RedisCache(url=url, prefix=f"embedworker:bench-{time.time_ns()}:", ttl_seconds=600)
    vectors = np.random.default_rng(0).standard_normal((batch, 384)).astype(np.float32)
    script_us, pipeline_us = [], []
    try:
        for b in range(batches):
            # Alternating arms, new keys each time: a drift of the machine's speed hits both alike.
            for arm, times in (("s", script_us), ("p", pipeline_us)):
                keys = [f"{cache._prefix}{arm}{b}-{i}" for i in range(batch)]
                values = [v.astype("<f4").tobytes() for v in vectors]
                started = time.perf_counter()
                if arm == "s":
                    await cache._set_script(keys=keys, args=[600, *values])
                else:
                    await cache._set_pipelined(keys, values)
                times.append((time.perf_counter() - started) / batch * 1e6)
    finally:
        await cache.close()
        if local is not None:
            local.close()
    script, pipeline = statistics.median(script_us), statistics.median(pipeline_us)
    return {"batch": batch, "batches": batches, "script_us_per_key": script, "pipeline_us_per_key": pipeline,
            "ratio": script / pipeline, **await _cache_read_costs(url, batches, batch)}


async def _cache_read_costs(url: str, batches: int, batch: int) -> dict[str, Any]:
    """Client time per key of a batch's MGET: redis-py's reply parser in C (hiredis, installed) against its Python one."""
    import redis.asyncio as redis
    from redis._parsers import _AsyncHiredisParser, _AsyncRESP2Parser

    prefix = f"embedworker:bench-read-{time.time_ns()}:"
    keys = [f"{prefix}{i}" for i in range(batch)]
    times: dict[str, list[float]] = {"hiredis": [], "python": []}
    clients = {"hiredis": redis.Redis.from_url(url, parser_class=_AsyncHiredisParser),
               "python": redis.Redis.from_url(url, parser_class=_AsyncRESP2Parser)}
    try:
        await clients["python"].mset({key: bytes(1536) for key in keys})  # 384 float32s a value
        for _ in range(batches):
            for name, client in clients.items():
                started = time.perf_counter()
                await client.mget(keys)
                times[name].append((time.perf_counter() - started) / batch * 1e6)
        await clients["python"].delete(*keys)
    finally:
        for client in clients.values():
            await client.aclose()
    hiredis, python = statistics.median(times["hiredis"]), statistics.median(times["python"])
    return {"read_hiredis_us_per_key": hiredis, "read_python_parser_us_per_key": python, "read_ratio": hiredis / python}


def edge_point_costs(points: int) -> dict[str, Any]:
    """qdrant-edge's `Point(id, vector, payload)` per point: the worker's payload against none, and per value type.

    The binding converts payload values in Python-side order (bool, number, str, ...), so a
    str or a dict pays for the failed attempts before it: the per-type figures show it."""
    import uuid

    import qdrant_edge as qe

    ids = [str(uuid.UUID(int=i)) for i in range(points)]
    vector = [0.1] * 384
    worker_payload = {
        "id": "kb-17", "chunk_index": 0, "chunk_count": 1, "chunk_start": 0, "chunk_end": 52, "metadata": {"lang": "en"},
        "content_hash": "9f" * 32, "model": "all-MiniLM-L6-v2", "truncated": False,
        "text": "Reset a password. Open settings and choose security.",
    }

    def cost(payload: Any) -> float:
        started = time.perf_counter()
        for point_id in ids:
            qe.Point(point_id, vector, payload)
        return (time.perf_counter() - started) / points * 1e6

    base = min(cost(None) for _ in range(3))
    result: dict[str, Any] = {"no_payload_us": base, "worker_payload_us": min(cost(worker_payload) for _ in range(3))}
    for kind, value in (("bool", True), ("int", 7), ("float", 0.5), ("str", "en"), ("dict", {})):
        result[f"one_{kind}_value_us"] = min(cost({"k": value}) for _ in range(3)) - base
    result["worker_payload_ratio"] = result["worker_payload_us"] / base
    result.update(_beside_python_thread(ids[:256], vector, worker_payload))
    return result


def _beside_python_thread(ids: list[str], vector: list[float], payload: dict[str, Any]) -> dict[str, Any]:
    """CPU and wall time a point (worker payload) costs alone and while another thread runs Python.

    Each failed try of the binding raises an error that pyo3 normalizes with the GIL released,
    so a thread that wants the GIL takes it then, and the builder waits for it back (up to the
    switch interval): in the worker, the event loop is that other thread."""
    import threading

    import qdrant_edge as qe

    def build() -> tuple[float, float]:
        cpu, wall = time.thread_time(), time.perf_counter()
        for point_id in ids:
            qe.Point(point_id, vector, payload)
        return (time.thread_time() - cpu) / len(ids) * 1e6, (time.perf_counter() - wall) / len(ids) * 1e6

    alone = min(build() for _ in range(3))
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            sum(range(100))

    spinner = threading.Thread(target=spin, daemon=True)
    spinner.start()
    try:
        beside = build()
    finally:
        stop.set()
        spinner.join()
    return {"alone_cpu_us": alone[0], "beside_python_cpu_us": beside[0], "beside_python_wall_us": beside[1],
            "beside_python_cpu_ratio": beside[0] / alone[0]}


def client_point_costs(points: int = 256, rounds: int = 10) -> dict[str, Any]:
    """qdrant-client's request for a batch of the worker's points (384 floats and its payload each),
    built and validated: one `PointStruct` a point (the sink before) against one `Batch` of
    ids, vectors and payloads (`QdrantSink` now); per point, best of three."""
    import uuid

    import numpy as np
    from qdrant_client import models

    vectors = np.random.default_rng(0).random((points, 384), dtype=np.float32)
    ids = [str(uuid.UUID(int=i)) for i in range(points)]
    payloads = [{
        "id": f"kb-{i}", "chunk_index": 0, "chunk_count": 1, "chunk_start": 0, "chunk_end": 52, "metadata": {"lang": "en"},
        "content_hash": "9f" * 32, "model": "all-MiniLM-L6-v2", "truncated": False,
        "text": "Reset a password. Open settings and choose security.",
    } for i in range(points)]

    def per_point(build: Any) -> float:
        best = float("inf")
        for _ in range(3):
            started = time.perf_counter()
            for _ in range(rounds):
                build()
            best = min(best, (time.perf_counter() - started) / rounds / points * 1e6)
        return best

    structs = per_point(lambda: models.PointsList(points=[
        models.PointStruct(id=ids[i], vector=vectors[i].tolist(), payload=payloads[i]) for i in range(points)]))
    batch = per_point(lambda: models.PointsBatch(batch=models.Batch(ids=ids, vectors=vectors.tolist(), payloads=payloads)))
    return {"points": points, "point_structs_us": structs, "batch_us": batch, "ratio": batch / structs}


def plot(result: dict[str, Any], path: Path) -> None:
    """One bar per measured ratio (each against its same-run baseline, drawn at 1.0)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot (pip install 'embedworker[bench]')", file=sys.stderr)
        return
    bars: dict[str, float] = {}
    for name, value in result["decode"].items():
        if name.endswith("_ratio"):
            bars[f"decode: {name.removesuffix('_ratio')}"] = value
    for kind in ("memory", "edge"):
        bars[f"guard ({kind})"] = result["version_guard"][kind]["ratio"]
        bars[f"metadata-only ({kind})"] = result["metadata_only"][kind]["ratio"]
    bars["cache write: script / pipeline"] = result["cache_writes"]["ratio"]
    bars["cache read: hiredis / Python parser"] = result["cache_writes"]["read_ratio"]
    bars["edge point: worker payload / none"] = result["edge_points"]["worker_payload_ratio"]
    bars["edge point: CPU beside a Python thread / alone"] = result["edge_points"]["beside_python_cpu_ratio"]
    bars["qdrant-client request: Batch / PointStructs"] = result["client_points"]["ratio"]
    figure, axes = plt.subplots(figsize=(8, 0.45 * len(bars) + 1.2))
    axes.barh(list(bars), list(bars.values()), color="#4878a8")
    axes.axvline(1.0, color="black", linewidth=0.8)
    axes.set_xscale("log")
    axes.set_xlabel("time per message or batch, ratio to the same run's baseline (log)")
    axes.invert_yaxis()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.host_costs", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=50_000, help="decode calls per event kind (default 50,000)")
    parser.add_argument("--rounds", type=int, default=8, help="batches of 256 updates per store (default 8)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "tmp")
    args = parser.parse_args(argv)
    result = {"decode": decode_costs(args.calls), "version_guard": asyncio.run(guard_costs(args.rounds, 256)),
              "metadata_only": asyncio.run(metadata_only_costs(3 * args.rounds, 256)),
              "cache_writes": asyncio.run(cache_write_costs(3 * args.rounds, 256)), "edge_points": edge_point_costs(max(1_000, args.calls // 2)),
              "client_points": client_point_costs(rounds=max(1, min(10, args.calls // 1_000)))}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "host_costs.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    plot(result, args.out / "host_costs.png")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
