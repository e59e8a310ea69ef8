"""Scenario `http`: the worker with `EMBEDWORKER_EMBEDDER=http` against the server driven directly.

A real OpenAI-compatible server (infinity-emb serving the bundled model on the CPU,
`make embedding-server`) embeds the same short texts twice in one measured unit: first
driven directly by the http client at the worker's request shape (32 inputs a request, 4
in flight), then through the whole worker (broker, Redis, store, result events) with the
http embedder. Reported: both rates and their ratio. The server runs beside the worker on
the same cores, so its CPU shows as "foreign" here and units are not redone for it.
"""

from __future__ import annotations

import time
from typing import Any

from bench.common import target
from bench.harness import CpuMeter, Context, median, run_worker_backlog, short_texts


async def http(ctx: Context) -> dict[str, Any]:
    from bench.embedding_server import available, embedding_server
    from processors.http_embedder import HttpEmbedder

    reason = available()
    if reason:
        return {"parameters": {"skipped": reason}, "repetitions": [], "medians": {}, "ratios": {}, "targets": [],
                "table": [("http embedder", "skipped", "", None)]}
    count = ctx.size(2000, 64)
    reps = []
    with embedding_server() as server:
        client = HttpEmbedder(url=server.url, model=server.model, max_batch=32, max_concurrency=4)
        try:
            client.embed(short_texts(64, seed=5))  # warm the server
            for rep in range(ctx.repeat):
                texts = [f"{t} #{rep}-{i}" for i, t in enumerate(short_texts(count, seed=900 + rep))]  # no cache hits
                await ctx.wait_quiet()
                with CpuMeter() as cpu:
                    started = time.perf_counter()
                    client.embed(texts)
                    seconds = time.perf_counter() - started
                direct = {"seconds": seconds, "rate": count / seconds, **cpu.as_dict()}
                worker = await run_worker_backlog(ctx, [f"{t} (worker)" for t in texts], embedder=client,
                                                  settings_overrides={"embedder": "http", "embeddings_url": server.url})
                worker.pop("_embed_calls", None)
                worker.pop("batch_sizes", None)
                reps.append({"rep": rep, "direct": direct, "worker": worker, "direct_rate": direct["rate"],
                             "worker_rate": worker["rate"], "worker_over_direct": worker["rate"] / direct["rate"]})
        finally:
            client.close()
    medians = {k: median([r[k] for r in reps]) for k in ("direct_rate", "worker_rate", "worker_over_direct")}
    return {
        "parameters": {"method": __doc__.split("\n\n", 1)[1].strip(), "texts": count, "server": "infinity-emb 0.0.78, torch, cpu",
                       "request_inputs": 32, "requests_in_flight": 4},
        "repetitions": reps,
        "medians": medians,
        "ratios": {"worker_over_direct": medians["worker_over_direct"]},
        "targets": [target("http_worker_over_direct", medians["worker_over_direct"], ">=", 0.8,
                           "Worker with the http embedder / the same server driven directly, same texts")],
        "table": [
            ("http: server driven directly", f"{medians['direct_rate']:.0f} texts/s", "", None),
            ("http: worker with the http embedder", f"{medians['worker_rate']:.0f} msg/s", "", None),
            ("http: worker / server direct", f"{medians['worker_over_direct']:.2f}", ">= 0.8", medians["worker_over_direct"] >= 0.8),
        ],
    }
