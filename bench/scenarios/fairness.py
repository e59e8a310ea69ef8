"""Scenario `fairness`: one tenant's backlog and another's trickle, with and without fair batching.

Tenant `big` has a backlog of 20,000 short texts in the input topic (4 partitions, keys
`big/<id>`) when the worker starts; tenant `small` then sends 20 texts a second (keys
`small/<id>`) until the backlog is done. Each arm is a full run of the Worker users run
(tenants from the `tenant` field, the tiny model of the `overhead` scenario, Redis,
qdrant-edge), once with `EMBEDWORKER_FAIR_BATCHING=true` and once with it off. Reported: the
trickle's latency (its send -> its result event's broker timestamp) p50 and p99 in each arm,
their ratio, and the backlog's rate in each arm (what fairness costs the big tenant).

What fair batching can and cannot do: it orders what is *buffered* (up to
`EMBEDWORKER_BUFFER_MAX_MESSAGES`, default 5,000); a trickle event behind the backlog in its
partition is fetched only after the backlog ahead of it there, whatever the batching. So the
two arms run twice: with the default buffer, and with one the whole backlog fits
(`buffer_max_messages` = backlog + 5,000), where fairness reaches every waiting event.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from typing import Any

import orjson

from bench.common import build_tiny_model, clean_share, target
from bench import harness
from bench.harness import Context, CpuMeter, WorkerParts, bench_worker, median, new_settings, on_torch_thread, percentile, produce_backlog, short_texts

PARTITIONS = 4
TRICKLE_PER_SECOND = 20.0


async def _arm(ctx: Context, embedder: Any, backlog: list[str], fair: bool, rep: int, buffer: int | None = None) -> dict[str, Any]:
    from aiokafka import AIOKafkaConsumer

    from streams.backends.kafka import make_producer
    from streams.metrics import Metrics

    extra = {"buffer_max_messages": buffer} if buffer else {}
    settings = await new_settings(ctx, partitions=PARTITIONS, tenant_from="tenant", fair_batching=fair, **extra)
    await produce_backlog(settings, [orjson.dumps({"id": f"doc-{i}", "text": t, "tenant": "big"}) for i, t in enumerate(backlog)],
                          keys=[f"big/doc-{i}".encode() for i in range(len(backlog))])
    parts = WorkerParts(ctx, settings)
    sent: dict[str, float] = {}
    producer = make_producer(settings, linger_ms=0)
    await producer.start()
    try:
        worker, probe = bench_worker(settings, embedder=embedder, sink=parts.sink, cache=parts.cache, metrics=Metrics(),
                                     target=10**9, backend=harness.BACKEND)
        task = asyncio.create_task(worker.run())
        while probe.first_consumed_at is None and not task.done():
            await asyncio.sleep(0.002)  # only to start the clock near the first fetch
        with CpuMeter() as cpu:
            began = time.perf_counter()
            n = 0
            while worker.stats.processed < len(backlog) + n and not task.done():
                if n < (time.perf_counter() - began) * TRICKLE_PER_SECOND and worker.stats.processed < len(backlog):
                    doc_id = f"t{rep}-{n}"
                    sent[doc_id] = time.time()
                    await producer.send(settings.input_topic, key=f"small/{doc_id}".encode(),
                                        value=orjson.dumps({"id": doc_id, "text": f"a small tenant's note number {n}", "tenant": "small"}))
                    n += 1
                await asyncio.sleep(0.005)  # the trickle's pacing
            seconds = time.perf_counter() - began
        worker.request_stop()
        await task
    finally:
        await producer.stop()
        await parts.close()
    reader = AIOKafkaConsumer(settings.output_topic, bootstrap_servers=settings.bootstrap_servers, auto_offset_reset="earliest",
                              enable_auto_commit=False)
    await reader.start()
    latencies: list[float] = []
    try:
        deadline = time.monotonic() + 60
        while len(latencies) < len(sent) and time.monotonic() < deadline:
            for records in (await reader.getmany(timeout_ms=500)).values():
                for record in records:
                    body = orjson.loads(record.value)
                    if body.get("tenant") == "small" and body["id"] in sent:
                        latencies.append(record.timestamp / 1000 - sent[body["id"]])
    finally:
        await reader.stop()
    latencies.sort()
    return {"fair": fair, "buffer_max_messages": settings.buffer_max_messages, "trickle_sent": len(sent), "trickle_results": len(latencies),
            "p50_seconds": percentile(latencies, 0.5), "p99_seconds": percentile(latencies, 0.99),
            "backlog_rate": len(backlog) / seconds, "seconds": seconds, **cpu.as_dict()}


async def fairness(ctx: Context) -> dict[str, Any]:
    from processors.embedder import SentenceTransformerEmbedder

    count = ctx.size(20_000, 2_000)
    path = on_torch_thread(build_tiny_model, tempfile.mkdtemp(prefix="embedworker-tiny-"))
    tiny = SentenceTransformerEmbedder(model=path, device=ctx.device, threads=ctx.torch_threads or None)
    reps = []
    for rep in range(ctx.repeat):
        backlog = [f"{t} #{rep}-{i}" for i, t in enumerate(short_texts(count, seed=500 + rep))]

        async def unit(rep: int = rep, backlog: list[str] = backlog) -> dict[str, Any]:
            whole = len(backlog) + 5000  # the backlog fits the buffer: fairness reaches every waiting event
            arms = {"fair": await _arm(ctx, tiny, backlog, True, rep), "unfair": await _arm(ctx, tiny, backlog, False, rep),
                    "fair_buffered": await _arm(ctx, tiny, backlog, True, rep, whole),
                    "unfair_buffered": await _arm(ctx, tiny, backlog, False, rep, whole)}
            for arm in arms.values():
                assert arm["trickle_results"] == arm["trickle_sent"], arm
            return {"rep": rep, **arms,
                    "p99_fair_over_unfair": arms["fair"]["p99_seconds"] / arms["unfair"]["p99_seconds"],
                    "p99_buffered_fair_over_unfair": arms["fair_buffered"]["p99_seconds"] / arms["unfair_buffered"]["p99_seconds"],
                    "backlog_rate_fair_over_unfair": arms["fair"]["backlog_rate"] / arms["unfair"]["backlog_rate"]}

        reps.append(await ctx.measured("fairness", unit))
    medians = {
        **{f"p99_{arm}": median([r[arm]["p99_seconds"] for r in reps]) for arm in ("fair_buffered", "unfair_buffered")},
        "p99_buffered_fair_over_unfair": median([r["p99_buffered_fair_over_unfair"] for r in reps]),
        "p99_fair": median([r["fair"]["p99_seconds"] for r in reps]), "p99_unfair": median([r["unfair"]["p99_seconds"] for r in reps]),
        "p50_fair": median([r["fair"]["p50_seconds"] for r in reps]), "p50_unfair": median([r["unfair"]["p50_seconds"] for r in reps]),
        "p99_fair_over_unfair": median([r["p99_fair_over_unfair"] for r in reps]),
        "backlog_rate_fair_over_unfair": median([r["backlog_rate_fair_over_unfair"] for r in reps]),
    }
    return {
        "parameters": {"method": __doc__.split("\n\n", 1)[1].strip(), "backlog": count, "partitions": PARTITIONS,
                       "trickle_per_second": TRICKLE_PER_SECOND, "device": tiny.device},
        "repetitions": reps,
        "medians": medians,
        "ratios": {"p99_fair_over_unfair": medians["p99_fair_over_unfair"],
                   "p99_buffered_fair_over_unfair": medians["p99_buffered_fair_over_unfair"],
                   "backlog_rate_fair_over_unfair": medians["backlog_rate_fair_over_unfair"]},
        "clean_units": clean_share(reps),
        "targets": [
            target("fairness_trickle_p99_buffered", medians["p99_buffered_fair_over_unfair"], "<=", 0.5,
                   "The trickle tenant's p99 latency with fair batching / without, the backlog within the buffer, same run"),
            target("fairness_backlog_rate", medians["backlog_rate_fair_over_unfair"], ">=", 0.9,
                   "The backlog's rate with fair batching / without (what fairness costs the big tenant)"),
        ],
        "table": [
            ("fairness: trickle p99, fair / unfair", f"{medians['p99_fair']:.2f}s / {medians['p99_unfair']:.2f}s", "", None),
            ("fairness: trickle p99 ratio (default buffer)", f"{medians['p99_fair_over_unfair']:.2f}", "", None),
            ("fairness: trickle p99, backlog buffered, fair / unfair",
             f"{medians['p99_fair_buffered']:.2f}s / {medians['p99_unfair_buffered']:.2f}s", "", None),
            ("fairness: trickle p99 ratio (backlog buffered)", f"{medians['p99_buffered_fair_over_unfair']:.2f}", "<= 0.5",
             medians["p99_buffered_fair_over_unfair"] <= 0.5),
            ("fairness: backlog rate ratio", f"{medians['backlog_rate_fair_over_unfair']:.2f}", ">= 0.9",
             medians["backlog_rate_fair_over_unfair"] >= 0.9),
        ],
    }
