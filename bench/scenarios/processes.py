"""Scenario `processes`: does the host path multiply with N worker processes on one host?

The tiny model of `overhead` (the real tokenizer, a 1-layer 32-wide BERT) makes the host
path the bound. The same backlog of short unique texts (8 partitions) is consumed by 1,
then by N `embedworker run` processes in one consumer group (local broker, Redis). The
rate is the result events' count over the span of their broker timestamps, first to last,
so the processes' start-up (model load, group join) is not counted. Each process keeps
its own embedded qdrant-edge store here (no Qdrant server runs on this machine): that
measures the host path, which is the question; `run --processes N` itself needs a Qdrant
server and refuses an embedded store.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

from bench.common import build_tiny_model, clean_share, target
from bench.harness import Context, encode_events, median, new_settings, on_torch_thread, produce_backlog, short_texts

PARTITIONS = 8


async def _results_span(settings: Any, expect: int, timeout: float) -> tuple[int, float]:
    """Result events read, and seconds between the first and the last one's broker timestamp."""
    from streams.backends.kafka import make_consumer

    consumer = make_consumer(settings, group_id=None, auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    consumer.subscribe([settings.output_topic])
    stamps: list[int] = []
    deadline = time.monotonic() + timeout
    try:
        while len(stamps) < expect and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=500, max_records=5000)
            stamps.extend(r.timestamp for records in batches.values() for r in records)
    finally:
        await consumer.stop()
    if len(stamps) < 2:
        return len(stamps), float("nan")
    return len(stamps), (max(stamps) - min(stamps)) / 1000.0


async def _run(ctx: Context, model: str, texts: list[str], processes: int) -> dict[str, Any]:
    settings = await new_settings(ctx, partitions=PARTITIONS)
    await produce_backlog(settings, encode_events(texts, settings.collection))
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBEDWORKER_")}
    env.update({"EMBEDWORKER_" + k.upper(): str(v) for k, v in {
        "bootstrap_servers": settings.bootstrap_servers, "input_topic": settings.input_topic,
        "output_topic": settings.output_topic, "dlq_topic": settings.dlq_topic, "group_id": settings.group_id,
        "collection": settings.collection, "redis_url": settings.redis_url, "metrics_port": 0, "device": ctx.device,
        "model": model, "torch_threads": max(1, (os.cpu_count() or 1) // processes), "log_level": "WARNING",
    }.items()})
    env["HF_HUB_OFFLINE"] = "1"
    stores = tempfile.mkdtemp(prefix="embedworker-stores-")
    children = [subprocess.Popen([sys.executable, "-m", "streams.cli", "run"],
                                 env={**env, "EMBEDWORKER_QDRANT_PATH": os.path.join(stores, str(i))},
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for i in range(processes)]
    try:
        count, seconds = await _results_span(settings, len(texts), timeout=600)
    finally:
        for child in children:
            child.terminate()
        for child in children:
            try:
                await asyncio.get_running_loop().run_in_executor(None, child.wait, 60)
            except subprocess.TimeoutExpired:
                child.kill()
    if count < len(texts):
        raise RuntimeError(f"{processes} processes published {count}/{len(texts)} results")
    return {"processes": processes, "messages": count, "seconds": seconds, "rate": count / seconds}


async def processes(ctx: Context) -> dict[str, Any]:

    count = ctx.size(30_000, 2_000)
    many = max(2, min(4, os.cpu_count() or 2))
    model = on_torch_thread(build_tiny_model, tempfile.mkdtemp(prefix="embedworker-tiny-"))
    reps = []
    for rep in range(ctx.repeat):
        texts = [f"{t} #{rep}-{i}" for i, t in enumerate(short_texts(count, seed=1100 + rep))]

        async def unit(texts: list[str] = texts) -> dict[str, Any]:
            one = await _run(ctx, model, [f"{t} (1)" for t in texts], 1)
            several = await _run(ctx, model, [f"{t} ({many})" for t in texts], many)
            return {"one": one, "many": several, "one_rate": one["rate"], "many_rate": several["rate"],
                    "speedup": several["rate"] / one["rate"], "foreign_cores": 0.0}
        reps.append({"rep": rep, **await ctx.measured("processes", unit)})
    medians = {k: median([r[k] for r in reps]) for k in ("one_rate", "many_rate", "speedup")}
    return {
        "parameters": {"method": __doc__.split("\n\n", 1)[1].strip(), "messages": count, "processes": many,
                       "partitions": PARTITIONS, "cores": os.cpu_count()},
        "repetitions": reps,
        "medians": medians,
        "ratios": {"speedup": medians["speedup"]},
        "clean_units": clean_share(reps),
        "targets": [target("processes_speedup", medians["speedup"], ">=", 1.0,
                           f"{many} worker processes / 1, tiny model, same backlog (host path bound)")],
        "table": [
            ("processes: 1 worker process, tiny model", f"{medians['one_rate']:.0f} msg/s", "", None),
            (f"processes: {many} worker processes", f"{medians['many_rate']:.0f} msg/s", "", None),
            (f"processes: {many} / 1", f"{medians['speedup']:.2f}x", ">= 1.0", medians["speedup"] >= 1.0),
        ],
    }
