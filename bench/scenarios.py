"""The seven scenarios. Each returns one JSON-ready result dict (see `bench.report`).

Ratios are computed per repetition from measurements taken back to back inside one
"measured unit" (the machine is shared; its speed drifts by tens of percent within
minutes and collapses when a neighbour takes a core), and the reported ratio is the
median of those paired ratios; `medians` holds the medians of the raw figures. Every
unit runs in a quiet moment and is redone if other processes used the CPU meanwhile
(`Context.measured`); its `noise` entry says how clean it was.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from typing import Any, Awaitable, Callable

import numpy as np

from bench import harness
from bench.harness import (
    Context,
    CpuMeter,
    WorkerParts,
    bench_worker,
    embed_ours,
    encode_ceiling,
    encode_events,
    fixed_count_embedder,
    load_average,
    median,
    mixed_texts,
    new_settings,
    on_torch_thread,
    percentile,
    replay_embed_calls,
    run_naive,
    run_worker_backlog,
    short_texts,
    trim_memory,
    RssSampler,
    warm_pipeline,
    with_duplicates,
)


def target(name: str, value: float, op: str, threshold: float, description: str) -> dict[str, Any]:
    passed = value >= threshold if op == ">=" else value <= threshold
    return {"name": name, "description": description, "value": value, "op": op, "threshold": threshold, "passed": bool(passed)}


def token_stats(ctx: Context, texts: list[str]) -> dict[str, float]:
    counts = ctx.embedder.count_tokens(texts)
    return {
        "texts": len(texts),
        "distinct": len(set(texts)),
        "tokens_mean": round(float(np.mean(counts)), 1),
        "tokens_p50": float(np.median(counts)),
        "tokens_max": int(max(counts)),
        "chars_mean": round(float(np.mean([len(t) for t in texts])), 1),
    }


def text_sets(ctx: Context) -> dict[str, list[str]]:
    return {"short": short_texts(ctx.size(2000, 64)), "mixed": mixed_texts(ctx.size(1200, 48))}


def clean_share(reps: list[dict[str, Any]]) -> str:
    units = [u for r in reps for u in ([r] if "noise" in r else [v for v in r.values() if isinstance(v, dict) and "noise" in v])]
    clean = sum(1 for u in units if u["noise"]["clean"])
    return f"{clean}/{len(units)}"


# ---- 1. ceiling -------------------------------------------------------------------------------


async def ceiling(ctx: Context) -> dict[str, Any]:
    sets = text_sets(ctx)
    reps = []
    for rep in range(ctx.repeat):
        row: dict[str, Any] = {"rep": rep, "load_average": load_average()}
        for kind, texts in sets.items():
            async def unit(texts: list[str] = texts) -> dict[str, Any]:
                encode = encode_ceiling(ctx.embedder, texts)
                embed = embed_ours(ctx.embedder, texts)
                return {"encode": encode, "encode_rate": encode["rate"], "embed": embed, "embed_rate": embed["rate"],
                        "embed_over_encode": embed["rate"] / encode["rate"]}
            row[kind] = await ctx.measured(f"ceiling {kind}", unit)
        reps.append(row)
    medians = {
        kind: {key: median([r[kind][key] for r in reps]) for key in ("encode_rate", "embed_rate", "embed_over_encode")}
        for kind in sets
    }
    ctx.shared["ceiling"] = medians
    return {
        "parameters": {
            "method": "embedder._model.encode(texts, batch_size=32, normalize_embeddings=True) vs embedder.embed(texts) "
                      "(length-aware sub-batches), same texts, back to back",
            "sets": {kind: token_stats(ctx, texts) for kind, texts in sets.items()},
            "batch_size": 32,
        },
        "repetitions": reps,
        "medians": medians,
        "ratios": {f"{kind}_embed_over_encode": medians[kind]["embed_over_encode"] for kind in sets},
        "targets": [],
        "clean_units": clean_share(reps),
        "table": [
            (f"ceiling, {kind}: model.encode bs=32", f"{medians[kind]['encode_rate']:.0f} msg/s", "", None) for kind in sets
        ] + [
            (f"ceiling, {kind}: embedder.embed (length-aware)",
             f"{medians[kind]['embed_rate']:.0f} msg/s = {medians[kind]['embed_over_encode']:.2f}x encode", "", None)
            for kind in sets
        ],
    }


# ---- 2. pipeline ------------------------------------------------------------------------------


async def pipeline(ctx: Context) -> dict[str, Any]:
    sets = text_sets(ctx)
    await warm_pipeline(ctx)
    reps = []
    for rep in range(ctx.repeat):
        row: dict[str, Any] = {"rep": rep, "load_average": load_average()}
        for kind, texts in sets.items():
            async def unit(texts: list[str] = texts) -> dict[str, Any]:
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
            row[kind] = await ctx.measured(f"pipeline {kind}", unit)
        reps.append(row)
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
    targets = [
        target(f"pipeline_over_ceiling_{kind}", medians[kind]["ratio"], ">=", 0.90,
               f"Worker end to end / model.encode(bs=32), {kind} texts, all unique")
        for kind in sets
    ]
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


# ---- 3. naive -----------------------------------------------------------------------------------


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
    targets = [
        target(f"pipeline_over_naive_{kind}", medians[kind]["ratio"], ">=", 10.0,
               f"Worker throughput / tutorial one-at-a-time consumer throughput, {kind} texts")
        for kind in sets
    ]
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


# ---- 4. duplicates ----------------------------------------------------------------------------


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


# ---- 5. mixed lengths: token budget vs fixed count ----------------------------------------


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


# ---- 6. profile sweep ---------------------------------------------------------------------------


def _length_count(chars: int, quick: bool) -> int:
    return 32 if quick else max(128, min(1024, 100_000 // chars))


async def profile(ctx: Context) -> dict[str, Any]:
    from streams.corpus import texts_of_length

    batch_sizes = [8, 32] if ctx.quick else [8, 16, 32, 64, 128, 256]
    lengths = [10, 100] if ctx.quick else [10, 50, 100, 250, 500, 1024]
    by_batch_texts = mixed_texts(ctx.size(512, 32), seed=606)
    by_length_texts = {chars: texts_of_length(_length_count(chars, ctx.quick), chars, seed=607) for chars in lengths}
    model = ctx.embedder._model
    tokens = {id(t): sum(ctx.embedder.count_tokens(t)) for t in [by_batch_texts, *by_length_texts.values()]}

    def measure(texts: list[str], batch_size: int) -> dict[str, float]:
        return on_torch_thread(_measure, texts, batch_size)

    def _measure(texts: list[str], batch_size: int) -> dict[str, float]:
        trim_memory()
        with RssSampler() as rss, CpuMeter() as cpu:
            started = time.perf_counter()
            model.encode(texts, batch_size=batch_size, normalize_embeddings=True, show_progress_bar=False)
            seconds = time.perf_counter() - started
        return {"texts": len(texts), "seconds": seconds, "rate": len(texts) / seconds, **cpu.as_dict(),
                "tokens_per_s": tokens[id(texts)] / seconds,
                "peak_rss_mib": rss.peak_rss / 2**20, "peak_rss_delta_mib": rss.delta_rss / 2**20}

    reps = []
    for rep in range(ctx.repeat):
        row: dict[str, Any] = {"rep": rep, "load_average": load_average(), "batch_size": {}, "text_length": {}}
        for bs in batch_sizes:
            async def unit(bs: int = bs) -> dict[str, Any]:
                return measure(by_batch_texts, bs)
            row["batch_size"][str(bs)] = await ctx.measured(f"profile bs {bs}", unit)
        for chars in lengths:
            async def unit(chars: int = chars) -> dict[str, Any]:
                return measure(by_length_texts[chars], 32)
            row["text_length"][str(chars)] = await ctx.measured(f"profile {chars} chars", unit)
        reps.append(row)
    medians = {
        sweep: {key: {m: median([r[sweep][key][m] for r in reps]) for m in ("rate", "tokens_per_s", "peak_rss_mib", "peak_rss_delta_mib")}
                for key in reps[0][sweep]}
        for sweep in ("batch_size", "text_length")
    }
    best_bs = max(medians["batch_size"], key=lambda k: medians["batch_size"][k]["rate"])
    units = [u for r in reps for sweep in ("batch_size", "text_length") for u in r[sweep].values()]
    return {
        "parameters": {
            "method": "model.encode(texts, batch_size=B) directly; RSS sampled every 5 ms in a thread; delta from just before "
                      "the call (after gc + malloc_trim); peak RSS is the whole process (model and libraries included)",
            "batch_size_sweep": {"batch_sizes": batch_sizes, "set": token_stats(ctx, by_batch_texts)},
            "text_length_sweep": {"batch_size": 32, "sets": {str(c): token_stats(ctx, t) for c, t in by_length_texts.items()}},
        },
        "repetitions": reps,
        "medians": medians,
        "ratios": {"best_over_worst_batch_size": max(v["rate"] for v in medians["batch_size"].values())
                   / min(v["rate"] for v in medians["batch_size"].values())},
        "targets": [],
        "clean_units": f"{sum(u['noise']['clean'] for u in units)}/{len(units)}",
        "table": [
            ("profile: texts/s by batch size (mixed)", ", ".join(f"{k}: {v['rate']:.0f}" for k, v in medians["batch_size"].items()) + f" (best {best_bs})", "", None),
            ("profile: peak RSS delta by batch size", ", ".join(f"{k}: {v['peak_rss_delta_mib']:.0f}" for k, v in medians["batch_size"].items()) + " MiB", "", None),
            ("profile: texts/s by length (chars, bs 32)", ", ".join(f"{k}: {v['rate']:.0f}" for k, v in medians["text_length"].items()), "", None),
            ("profile: peak RSS delta by length", ", ".join(f"{k}: {v['peak_rss_delta_mib']:.0f}" for k, v in medians["text_length"].items()) + " MiB", "", None),
        ],
    }


# ---- 7. latency at light load --------------------------------------------------------------------


async def _steady_producer(settings: Any, values: list[bytes], rate: float) -> float:
    from streams.backends.kafka import make_producer

    producer = make_producer(settings, linger_ms=0)
    await producer.start()
    loop = asyncio.get_running_loop()
    try:
        start = loop.time()
        for i, value in enumerate(values):
            delay = start + i / rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)  # pacing the producer
            await producer.send(settings.input_topic, value=value, key=str(i).encode())
        await producer.flush()
        return loop.time() - start
    finally:
        await producer.stop()


@contextlib.contextmanager
def client_overrides(overrides: dict[str, dict[str, Any]] | None):
    """What-if only: extra aiokafka options ({"consumer": {...}, "producer": {...}}) for
    the Kafka clients of workers started inside (through the Worker's `backend`)."""
    from bench import harness
    from streams.backends.kafka import KafkaBackend

    if not overrides:
        yield
        return
    previous = harness.BACKEND
    harness.BACKEND = KafkaBackend(consumer_overrides=overrides.get("consumer", {}), producer_overrides=overrides.get("producer", {}))
    try:
        yield
    finally:
        harness.BACKEND = previous


def shipped_client_options() -> dict[str, Any]:
    """The latency-relevant options the Worker's Kafka clients get today (read as data)."""
    from streams.backends.kafka import consumer_options, producer_options
    from streams.config import load_settings

    settings = load_settings({}, environ={})
    return {"consumer_fetch_max_wait_ms": consumer_options(settings)["fetch_max_wait_ms"],
            "producer_linger_ms": producer_options(settings)["linger_ms"]}


async def _latency_window(ctx: Context, pool: list[str], rng: random.Random, rate: float, duration: float,
                          consumer: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    from streams.metrics import Metrics

    warmup = 5
    settings = await new_settings(ctx)
    count = max(10, int(rate * duration))
    texts = rng.sample(pool, warmup + count)
    values = encode_events(texts, settings.collection)
    parts = WorkerParts(ctx, settings)
    metrics = Metrics()
    worker, probe = bench_worker(settings, embedder=ctx.embedder, sink=parts.sink, cache=parts.cache, metrics=metrics,
                                   target=warmup + count, backend=harness.BACKEND)
    sample = metrics.registry.get_sample_value
    with client_overrides(consumer):
        task = asyncio.create_task(worker.run())
        await asyncio.sleep(0)  # let run() build its clients inside the override
    try:
        await _steady_producer(settings, values[:warmup], rate)
        deadline = time.monotonic() + 60
        while worker.stats.processed < warmup:
            if task.done():
                task.result()
            if time.monotonic() > deadline:
                raise TimeoutError("latency warm-up messages were not processed")
            await asyncio.sleep(0.05)  # polling with a deadline, outside the measured window
        batches_before = len(worker.stats.batch_sizes)
        embed_n0 = sample("embedworker_embed_duration_seconds_count") or 0.0
        embed_sum0 = sample("embedworker_embed_duration_seconds_sum") or 0.0
        batch_sum0 = sample("embedworker_batch_duration_seconds_sum") or 0.0
        load_before = load_average()
        with CpuMeter() as cpu:
            produce_seconds = await _steady_producer(settings, values[warmup:], rate)
            await asyncio.wait_for(probe.done.wait(), timeout=120)
    finally:
        worker.request_stop()
        await asyncio.wait_for(task, timeout=60)
        await parts.close()
    latencies = list(worker.stats.latencies)[warmup:]
    sizes = list(worker.stats.batch_sizes)[batches_before:]
    embed_n = (sample("embedworker_embed_duration_seconds_count") or 0.0) - embed_n0
    embed_sum = (sample("embedworker_embed_duration_seconds_sum") or 0.0) - embed_sum0
    batch_sum = (sample("embedworker_batch_duration_seconds_sum") or 0.0) - batch_sum0
    observed = max(1, int(round(median(sizes))))
    # The reference: median time to embed one batch of the observed size, measured right
    # after the window, with the worker stopped, on texts of the same distribution.
    timings = []
    for _ in range(ctx.size(40, 6)):
        chosen = rng.sample(pool, observed)
        started = time.perf_counter()
        ctx.embedder.embed(chosen)
        timings.append(time.perf_counter() - started)
    batch_embed = median(timings)
    max_wait = settings.batch_min_wait_ms / 1000
    return {
        "load_average": load_before, **cpu.as_dict(),
        "messages": len(latencies), "rate_target": rate, "rate_achieved": count / produce_seconds,
        "p50_ms": percentile(latencies, 0.50) * 1000, "p95_ms": percentile(latencies, 0.95) * 1000,
        "p99_ms": percentile(latencies, 0.99) * 1000, "max_ms": max(latencies) * 1000,
        "batch_size_median": median(sizes), "batch_size_p95": percentile(sizes, 0.95), "batch_size_max": max(sizes),
        "batches": len(sizes),
        "in_pipeline_embed_ms_mean": 1000 * embed_sum / embed_n if embed_n else None,
        "batch_duration_ms_mean": 1000 * batch_sum / len(sizes) if sizes else None,
        "isolated_batch_embed_ms_median": batch_embed * 1000, "isolated_batch_embed_ms_p95": percentile(timings, 0.95) * 1000,
        "max_wait_ms": max_wait * 1000, "target_ms": (max_wait + 2 * batch_embed) * 1000,
        "latencies_ms": [round(x * 1000, 2) for x in latencies],
    }


LATENCY_WHATIF_CONSUMER = {"fetch_max_wait_ms": 20}


def latency_whatif(shipped: dict[str, Any]) -> tuple[str, dict[str, dict[str, Any]], str]:
    """The what-if arm: half the shipped broker fetch wait (the Kafka-side wait a message sees
    at light load on a broker that holds fetches)."""
    wait = max(1, int(shipped["consumer_fetch_max_wait_ms"]) // 2)
    return f"whatif_fetch_max_wait_{wait}ms", {"consumer": {"fetch_max_wait_ms": wait}}, f"consumer fetch_max_wait_ms={wait}"


async def latency(ctx: Context) -> dict[str, Any]:
    await warm_pipeline(ctx)
    if ctx.shared.get("pipeline_rates", {}).get("mixed"):
        capacity = median(ctx.shared["pipeline_rates"]["mixed"])
        capacity_source = "pipeline scenario of this run (mixed texts, median)"
    else:
        async def unit() -> dict[str, Any]:
            return await run_worker_backlog(ctx, mixed_texts(ctx.size(1200, 48), seed=707))
        capacity = (await ctx.measured("latency capacity", unit))["rate"]
        capacity_source = "measured here (mixed texts backlog)"
    rate = 0.1 * capacity
    duration = ctx.size(20, 4)
    pool = mixed_texts(ctx.size(2000, 200), seed=708)
    rng = random.Random(709)
    shipped = shipped_client_options()
    whatif_name, whatif_overrides, whatif_label = latency_whatif(shipped)
    arms = {"default": None, whatif_name: whatif_overrides}
    reps = []
    for rep in range(ctx.repeat):
        row: dict[str, Any] = {"rep": rep}
        for arm, consumer in arms.items():
            async def unit(consumer: dict[str, Any] | None = consumer) -> dict[str, Any]:
                return await _latency_window(ctx, pool, rng, rate, duration, consumer)
            row[arm] = await ctx.measured(f"latency {arm}", unit)
        reps.append(row)
    summary: dict[str, Any] = {}
    for arm in arms:
        pooled = [x / 1000 for r in reps for x in r[arm]["latencies_ms"]]
        summary[arm] = {
            "pooled_p50_ms": percentile(pooled, 0.50) * 1000, "pooled_p95_ms": percentile(pooled, 0.95) * 1000,
            "pooled_p99_ms": percentile(pooled, 0.99) * 1000, "messages": len(pooled),
            **{key: median([r[arm][key] for r in reps]) for key in (
                "p50_ms", "p95_ms", "p99_ms", "batch_size_median", "isolated_batch_embed_ms_median",
                "in_pipeline_embed_ms_mean", "batch_duration_ms_mean", "rate_achieved", "target_ms")},
        }
    medians = {**summary["default"], "whatif": summary[whatif_name]}
    target_ms = summary["default"]["target_ms"]
    targets = [target("p99_latency_ms", summary["default"]["pooled_p99_ms"], "<=", target_ms,
                      "p99 produce timestamp -> result acknowledged at ~10% load <= batch_min_wait_ms + "
                      "2 x median embed time of one batch of the observed size")]
    w = summary[whatif_name]
    return {
        "parameters": {
            "method": "worker running and warmed; messages produced at a steady rate (linger 0) for the window; "
                      "latency = result acknowledged - Kafka CreateTime (worker.stats.latencies); percentiles pooled over repetitions. "
                      f"What-if arm (not the target): the same worker with {whatif_label} (the local Tansu broker holds "
                      "a fetch for the whole fetch_max_wait_ms instead of answering when data arrives)",
            "capacity_msg_per_s": capacity, "capacity_source": capacity_source,
            "load_share": 0.1, "rate_msg_per_s": rate, "window_seconds": duration,
            "batch_min_wait_ms": _default("batch_min_wait_ms"),
            "shipped_client_options": shipped,
            "whatif_arm": whatif_name, "whatif_client_options": whatif_overrides,
            "set": token_stats(ctx, pool),
        },
        "repetitions": reps,
        "medians": medians,
        "ratios": {"p99_over_target": summary["default"]["pooled_p99_ms"] / target_ms,
                   "whatif_p99_over_target": w["pooled_p99_ms"] / w["target_ms"]},
        "targets": targets,
        "clean_units": clean_share(reps),
        "table": [
            (f"latency at {rate:.0f} msg/s (10% of {capacity:.0f}), p50/p95/p99",
             f"{summary['default']['pooled_p50_ms']:.0f} / {summary['default']['pooled_p95_ms']:.0f} / {summary['default']['pooled_p99_ms']:.0f} ms",
             f"p99 <= {target_ms:.0f} ms", targets[0]["passed"]),
            (f"latency what-if: {whatif_label}",
             f"{w['pooled_p50_ms']:.0f} / {w['pooled_p95_ms']:.0f} / {w['pooled_p99_ms']:.0f} ms", f"(p99 <= {w['target_ms']:.0f} ms)",
             None),
        ],
    }


def _default(name: str) -> Any:
    from streams.config import OPTIONS

    return next(o.default for o in OPTIONS if o.name == name)


from bench.chunking import chunking  # noqa: E402  (these import `target` from here)
from bench.overhead import overhead  # noqa: E402
from bench.recall import recall  # noqa: E402
from bench.http_server import http  # noqa: E402
from bench.processes import processes  # noqa: E402

SCENARIOS: dict[str, Callable[[Context], Awaitable[dict[str, Any]]]] = {
    "ceiling": ceiling,
    "pipeline": pipeline,
    "naive": naive,
    "duplicates": duplicates,
    "mixed_lengths": mixed_lengths,
    "profile": profile,
    "latency": latency,
    "overhead": overhead,
    "chunking": chunking,
    "recall": recall,
    "http": http,
    "processes": processes,
}
