"""The `mixed_lengths` scenario (see `bench.registry`)."""

from __future__ import annotations

from typing import Any

from bench.common import clean_share, target, token_stats
from bench.harness import Context, fixed_count_embedder, load_average, median, mixed_texts, run_worker_backlog, warm_pipeline


FIXED_COUNT_SETTINGS = {
    "batch_min_messages": 256, "batch_max_messages": 256,
    # Token limits out of the way, so only the count closes a batch.
    "batch_min_tokens": 10**9, "batch_max_tokens": 10**9,
}


async def mixed_lengths(ctx: Context) -> dict[str, Any]:
    texts = mixed_texts(ctx.size(1200, 48), seed=505)
    fixed = fixed_count_embedder(ctx.embedder, 256)
    await warm_pipeline(ctx)
    reps = []
    for rep in range(ctx.repeat):
        order = ["token_budget", "fixed_count"] if rep % 2 == 0 else ["fixed_count", "token_budget"]

        async def unit(order: list[str] = order) -> dict[str, Any]:
            row: dict[str, Any] = {"order": order}
            for arm in order:  # alternate the order so drift does not favour one arm
                if arm == "token_budget":
                    row[arm] = await run_worker_backlog(ctx, texts)
                else:
                    row[arm] = await run_worker_backlog(ctx, texts, embedder=fixed, settings_overrides=FIXED_COUNT_SETTINGS)
            row["token_over_fixed"] = row["token_budget"]["rate"] / row["fixed_count"]["rate"]
            return row
        reps.append({"rep": rep, "load_average": load_average(), **await ctx.measured("mixed lengths", unit)})
    medians = {arm: {"rate": median([r[arm]["rate"] for r in reps]),
                     "batch_size_median": median([r[arm]["batch_size_median"] for r in reps]),
                     "embed_thread_busy_seconds": median([r[arm]["embed_thread_busy_seconds"] for r in reps])}
               for arm in ("token_budget", "fixed_count")}
    ratio = median([r["token_over_fixed"] for r in reps])
    targets = [target("token_budget_over_fixed_count", ratio, ">=", 1.3, "default token-budget batching / fixed 256 per batch, mixed lengths")]
    return {
        "parameters": {
            "method": "Worker end to end on the same mixed-length backlog; token_budget = default settings and SentenceTransformerEmbedder; "
                      "fixed_count = batches of exactly 256 messages (token limits disabled) and one model.encode(batch_size=256) per batch "
                      "(SentenceTransformerEmbedder(max_sub_batch=256, sub_batch_tokens=10**9) would still plan length-aware sub-batches)",
            "fixed_count_settings": FIXED_COUNT_SETTINGS,
            "set": token_stats(ctx, texts),
        },
        "repetitions": reps,
        "medians": medians,
        "ratios": {"token_budget_over_fixed_count": ratio},
        "targets": targets,
        "clean_units": clean_share(reps),
        "table": [
            ("mixed lengths: fixed count 256/batch", f"{medians['fixed_count']['rate']:.0f} msg/s", "", None),
            ("mixed lengths: token budget (default)", f"{medians['token_budget']['rate']:.0f} msg/s = {ratio:.2f}x fixed", ">= 1.3x", targets[0]["passed"]),
        ],
    }
