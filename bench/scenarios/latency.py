"""The `latency` scenario (see `bench.registry`)."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from typing import Any

from bench import harness
from bench.common import clean_share, default_option, target, token_stats
from bench.harness import Context, CpuMeter, WorkerParts, bench_worker, encode_events, load_average, median, mixed_texts, new_settings, percentile, run_worker_backlog, warm_pipeline


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
            "batch_min_wait_ms": default_option("batch_min_wait_ms"),
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
