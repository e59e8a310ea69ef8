"""The `pipeline` scenario (see `bench.registry`)."""

from __future__ import annotations

from typing import Any

from bench.common import clean_share, per_set_reps, per_set_targets, text_sets, token_stats
from bench.harness import Context, encode_ceiling, median, replay_embed_calls, run_worker_backlog, warm_pipeline


async def pipeline(ctx: Context) -> dict[str, Any]:
    sets = text_sets(ctx)
    await warm_pipeline(ctx)

    async def unit(texts: list[str]) -> dict[str, Any]:
        ceiling_run = encode_ceiling(ctx.embedder, texts)
        run = await run_worker_backlog(ctx, texts)
        assert run["cached"] == 0, "all-unique texts must not hit the cache"
        # The worker's own embed calls (same batches), replayed without the worker:
        # splits the gap into batching (replay/ceiling) and overhead (pipeline/replay).
        replay = replay_embed_calls(ctx.embedder, run["_embed_calls"])
        return {
            "ceiling": ceiling_run, "ceiling_rate": ceiling_run["rate"],
            "pipeline": run, "pipeline_rate": run["rate"], "ratio": run["rate"] / ceiling_run["rate"],
            "replay": replay, "replay_over_ceiling": replay["rate"] / ceiling_run["rate"],
            "pipeline_over_replay": run["rate"] / replay["rate"],
        }

    reps = await per_set_reps(ctx, sets, "pipeline", unit)
    keys = ("ceiling_rate", "pipeline_rate", "ratio", "replay_over_ceiling", "pipeline_over_replay")
    medians = {
        kind: {
            **{key: median([r[kind][key] for r in reps]) for key in keys},
            "embed_thread_busy_share": median([r[kind]["pipeline"]["embed_thread_busy_share"] for r in reps]),
            "batch_size_median": median([r[kind]["pipeline"]["batch_size_median"] for r in reps]),
            "own_cores": median([r[kind]["pipeline"]["own_cores"] for r in reps]),
            "ceiling_own_cores": median([r[kind]["ceiling"]["own_cores"] for r in reps]),
            "fetch_loop_rounds_per_s": median([r[kind]["pipeline"]["fetch_loop_rounds_per_s"] for r in reps]),
        }
        for kind in sets
    }
    ctx.shared["pipeline_rates"] = {kind: [r[kind]["pipeline_rate"] for r in reps] for kind in sets}
    targets = per_set_targets("pipeline_over_ceiling", medians, sets, 0.90, "Worker end to end / model.encode(bs=32), {kind} texts, all unique")
    return {
        "parameters": {
            "method": "backlog produced first; timer from the first message consumed to the last result acknowledged "
                      "(stats.processed = N); ceiling (model.encode bs=32) measured right before each run on the same texts; "
                      "replay = the worker's recorded embed calls (same batches) run again through embedder.embed alone",
            "sets": {kind: token_stats(ctx, texts) for kind, texts in sets.items()},
            "settings": "defaults (streams.config), Redis cache with a fresh prefix, the default embedded Qdrant engine (qdrant-edge, write-ahead log) in a fresh directory",
            "threads": "ceiling, replay and the Worker all run torch on the process's one torch thread "
                       "(processors.torch_thread), so one OpenMP pool exists (native_threads_before in each run)",
        },
        "repetitions": reps,
        "medians": medians,
        "ratios": {f"{kind}_{key}": medians[kind][key] for kind in sets
                   for key in ("ratio", "replay_over_ceiling", "pipeline_over_replay")},
        "targets": targets,
        "clean_units": clean_share(reps),
        "table": [
            (f"pipeline, {kind}: Worker end to end",
             f"{medians[kind]['pipeline_rate']:.0f} msg/s = {medians[kind]['ratio']:.2f}x ceiling ({medians[kind]['ceiling_rate']:.0f}); "
             f"replay {medians[kind]['replay_over_ceiling']:.2f}x, busy {medians[kind]['embed_thread_busy_share']:.2f}",
             ">= 0.90x", targets[i]["passed"])
            for i, kind in enumerate(sets)
        ],
    }
