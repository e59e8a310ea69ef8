"""The `naive` scenario (see `bench.registry`)."""

from __future__ import annotations

from typing import Any

from bench.common import clean_share, per_set_targets, text_sets
from bench.harness import Context, load_average, median, run_naive, run_worker_backlog, warm_pipeline


async def naive(ctx: Context) -> dict[str, Any]:
    sets = text_sets(ctx)
    naive_n = ctx.size(200, 16)
    await run_naive(ctx, sets["short"][:8])  # warm-up: clients, first single-text forward pass
    reused = "pipeline_rates" in ctx.shared
    pipeline_rates: dict[str, list[float]] = dict(ctx.shared.get("pipeline_rates", {}))
    if not reused:
        await warm_pipeline(ctx)
    reps = []
    for rep in range(ctx.repeat):
        row: dict[str, Any] = {"rep": rep, "load_average": load_average()}
        for kind, texts in sets.items():
            async def unit(kind: str = kind, texts: list[str] = texts) -> dict[str, Any]:
                out: dict[str, Any] = {}
                if not reused:
                    out["pipeline"] = await run_worker_backlog(ctx, texts)
                    pipeline_rates.setdefault(kind, []).append(out["pipeline"]["rate"])
                out["naive"] = await run_naive(ctx, texts[:naive_n])
                return out
            result = await ctx.measured(f"naive {kind}", unit)
            pipe = pipeline_rates[kind][rep % len(pipeline_rates[kind])]
            result.update(naive_rate=result["naive"]["rate"], pipeline_rate=pipe, ratio=pipe / result["naive"]["rate"])
            row[kind] = result
        reps.append(row)
    medians = {
        kind: {
            "naive_rate": median([r[kind]["naive_rate"] for r in reps]),
            "pipeline_rate": median(pipeline_rates[kind]),
            "ratio": median([r[kind]["ratio"] for r in reps]),
            # One text per model.encode call, nothing else: the most a one-at-a-time
            # consumer could reach with free I/O, so pipeline / this bounds what batching gives.
            "naive_encode_only_rate": median([r[kind]["naive"]["encode_only_rate"] for r in reps]),
            "pipeline_over_naive_encode_only": median([r[kind]["pipeline_rate"] / r[kind]["naive"]["encode_only_rate"] for r in reps]),
            "naive_per_message_ms": {
                step: median([r[kind]["naive"]["per_message_ms"][step] for r in reps])
                for step in ("getone", "encode", "upsert", "send_and_wait", "commit")
            },
        }
        for kind in sets
    }
    targets = per_set_targets("pipeline_over_naive", medians, sets, 10.0,
                              "Worker throughput / tutorial one-at-a-time consumer throughput, {kind} texts")
    return {
        "parameters": {
            "method": "AIOKafkaConsumer.getone -> model.encode([text]) -> QdrantClient(':memory:').upsert(1 point) -> "
                      "producer.send_and_wait(result) -> consumer.commit(), on the first texts of the pipeline scenario's sets",
            "naive_messages": naive_n,
            "pipeline_messages": {kind: len(texts) for kind, texts in sets.items()},
            "pipeline_rates_source": "pipeline scenario of this run (paired by repetition)" if reused else "measured here",
        },
        "repetitions": reps,
        "medians": medians,
        "ratios": {**{f"{kind}_pipeline_over_naive": medians[kind]["ratio"] for kind in sets},
                   **{f"{kind}_pipeline_over_naive_encode_only": medians[kind]["pipeline_over_naive_encode_only"] for kind in sets}},
        "targets": targets,
        "clean_units": clean_share(reps),
        "table": [
            (f"naive, {kind}: one-at-a-time consumer",
             f"{medians[kind]['naive_rate']:.0f} msg/s; Worker = {medians[kind]['ratio']:.1f}x naive "
             f"(model alone at 1 text/call: {medians[kind]['pipeline_over_naive_encode_only']:.1f}x)",
             ">= 10x", targets[i]["passed"])
            for i, kind in enumerate(sets)
        ],
    }
