"""The `duplicates` scenario (see `bench.registry`)."""

from __future__ import annotations

from typing import Any

from bench.common import clean_share, target, token_stats
from bench.harness import Context, load_average, median, mixed_texts, run_worker_backlog, warm_pipeline, with_duplicates


async def duplicates(ctx: Context) -> dict[str, Any]:
    base = mixed_texts(ctx.size(1200, 48), seed=404)
    arms = {"unique": list(base), "dup50": with_duplicates(base, 0.5), "dup90": with_duplicates(base, 0.9)}
    await warm_pipeline(ctx)
    reps = []
    for rep in range(ctx.repeat):
        async def unit() -> dict[str, Any]:
            row: dict[str, Any] = {arm: await run_worker_backlog(ctx, texts) for arm, texts in arms.items()}
            for arm in ("dup50", "dup90"):
                row[f"{arm}_over_unique"] = row[arm]["rate"] / row["unique"]["rate"]
            return row
        reps.append({"rep": rep, "load_average": load_average(), **await ctx.measured("duplicates", unit)})
    medians = {arm: {"rate": median([r[arm]["rate"] for r in reps]),
                     "cached": median([r[arm]["cached"] for r in reps]),
                     "texts_embedded": median([r[arm]["texts_embedded"] for r in reps]),
                     "embed_thread_busy_share": median([r[arm]["embed_thread_busy_share"] for r in reps])} for arm in arms}
    ratios = {f"{arm}_over_unique": median([r[f"{arm}_over_unique"] for r in reps]) for arm in ("dup50", "dup90")}
    targets = [target("dup90_over_unique", ratios["dup90_over_unique"], ">=", 5.0,
                      "throughput with 90% repeated content / all unique (mixed texts)")]
    return {
        "parameters": {
            "method": "same N messages with unique ids; texts drawn from a pool of (1-share)*N distinct texts, each used at least once, "
                      "shuffled; fresh Redis prefix per run (hits come only from repeats inside the run)",
            "messages": len(base),
            "distinct_texts": {arm: len(set(texts)) for arm, texts in arms.items()},
            "set": token_stats(ctx, base),
        },
        "repetitions": reps,
        "medians": medians,
        "ratios": ratios,
        "targets": targets,
        "clean_units": clean_share(reps),
        "table": [
            ("duplicates: all unique (mixed)", f"{medians['unique']['rate']:.0f} msg/s", "", None),
            ("duplicates: 50% repeated", f"{medians['dup50']['rate']:.0f} msg/s = {ratios['dup50_over_unique']:.2f}x unique", "", None),
            ("duplicates: 90% repeated", f"{medians['dup90']['rate']:.0f} msg/s = {ratios['dup90_over_unique']:.2f}x unique", ">= 5x", targets[0]["passed"]),
        ],
    }
