"""Scenario `overhead`: is the host path (Kafka, decode, cache, store, results, offsets) faster than the model?

On a CPU the real model sets the pace, so every other scenario measures the model. Here a
near-free model stands in for a GPU: the bundled model's config and real tokenizer cut to
1 layer of width 32 with random weights (fixed seed), built at run time (no download).
In one measured unit, on the same short texts:
- `encode`: that tiny model's `encode` alone (batch size 256, tokenization included);
- `passthrough`: a minimal aiokafka group consumer that decodes each message, produces a
  small JSON result per message and commits (what a Kafka hop costs, with nothing else);
- `worker`: `embedworker`'s Worker end to end with Redis and the default embedded store.
Reported: both ratios, the worker's pauses, CPU per message, host CPU per message (the worker's CPU
minus the tiny model's encode CPU on the same texts), each thread's cores (`thread_cores`), Python's
garbage collections during the run (`gc`) and a py-spy summary; then `encode` and `worker` again with torch on one thread (`one_torch_thread`,
other texts), the GPU-host stand-in: the model keeps one core, the host path gets the other.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from typing import Any

import orjson

from bench.common import TINY, build_tiny_model, clean_share, target
from bench.harness import (
    Context, CpuMeter, encode_events, median, new_settings, on_torch_thread, produce_backlog, run_worker_backlog, short_texts,
)

async def _passthrough(ctx: Context, texts: list[str]) -> dict[str, Any]:
    """decode -> one small result per message -> commit per fetched batch; timed like the worker."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    settings = await new_settings(ctx)
    await produce_backlog(settings, encode_events(texts, settings.collection))
    consumer = AIOKafkaConsumer(settings.input_topic, bootstrap_servers=settings.bootstrap_servers, group_id=settings.group_id,
                                enable_auto_commit=False, auto_offset_reset="earliest", fetch_max_wait_ms=10)
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers, linger_ms=5)
    await consumer.start()
    await producer.start()
    done, started, cpu = 0, None, CpuMeter()
    try:
        while done < len(texts):
            batches = await consumer.getmany(timeout_ms=100, max_records=2000)
            if started is None and batches:
                started = time.perf_counter()
                cpu.__enter__()
            acks = []
            for records in batches.values():
                for record in records:
                    event = orjson.loads(record.value)
                    acks.append(await producer.send(settings.output_topic, orjson.dumps({"id": event["id"], "status": "ok"}),
                                                    key=event["id"].encode()))
            if acks:
                await asyncio.gather(*acks)
                await consumer.commit()
                done += len(acks)
        seconds = time.perf_counter() - started  # type: ignore[operator]
        cpu.__exit__()
    finally:
        await consumer.stop()
        await producer.stop()
    return {"messages": len(texts), "seconds": seconds, "rate": len(texts) / seconds, **cpu.as_dict()}


def _encode(embedder: Any, texts: list[str]) -> dict[str, Any]:
    def run() -> dict[str, Any]:
        with CpuMeter() as cpu:
            started = time.perf_counter()
            embedder._model.encode(texts, batch_size=256, normalize_embeddings=True, show_progress_bar=False)
            seconds = time.perf_counter() - started
        return {"messages": len(texts), "seconds": seconds, "rate": len(texts) / seconds, **cpu.as_dict()}

    return on_torch_thread(run)


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


async def _with_torch_threads(threads: int, work: Any) -> Any:
    """Await `work` with torch on `threads` threads (process-wide), then restore the count."""
    import torch

    before = on_torch_thread(_torch_threads)
    on_torch_thread(torch.set_num_threads, threads)
    try:
        return await work
    finally:
        on_torch_thread(torch.set_num_threads, before)


async def _worker_and_model(ctx: Context, tiny: Any, texts: list[str], *, profile_seconds: float) -> dict[str, Any]:
    """The tiny model's encode alone, then the worker end to end, on the same texts."""
    encode = _encode(tiny, texts)
    worker = await run_worker_backlog(ctx, texts, embedder=tiny, profile_seconds=profile_seconds)
    worker.pop("_embed_calls", None)
    cpu_ms = 1000 * worker["own_cores"] * worker["seconds"] / worker["messages"]
    model_cpu_ms = 1000 * encode["own_cores"] * encode["seconds"] / encode["messages"]
    return {
        "model_cpu_ms_per_message": model_cpu_ms, "host_cpu_ms_per_message": cpu_ms - model_cpu_ms,
        "thread_cores": worker["thread_cores"], "gc": worker["gc"], "encode": encode, "worker": worker,
        "encode_rate": encode["rate"], "worker_rate": worker["rate"], "worker_over_encode": worker["rate"] / encode["rate"],
        "pauses": worker["pauses"], "cpu_ms_per_message": cpu_ms,
    }


async def overhead(ctx: Context) -> dict[str, Any]:
    from processors.embedder import SentenceTransformerEmbedder


    count = ctx.size(30_000, 2_000)
    directory = tempfile.mkdtemp(prefix="embedworker-tiny-")
    path = on_torch_thread(build_tiny_model, directory)
    tiny = SentenceTransformerEmbedder(model=path, device=ctx.device, threads=ctx.torch_threads or None)
    on_torch_thread(lambda: tiny._model.encode(short_texts(512, seed=7), batch_size=256, show_progress_bar=False))
    threads_before = on_torch_thread(_torch_threads)
    reps = []
    for rep in range(ctx.repeat):
        texts = [f"{t} #{rep}-{i}" for i, t in enumerate(short_texts(count, seed=700 + rep))]  # all unique: no cache hits

        async def unit(texts: list[str] = texts, rep: int = rep) -> dict[str, Any]:
            passthrough = await _passthrough(ctx, texts)
            figures = await _worker_and_model(ctx, tiny, texts, profile_seconds=0 if ctx.quick else 10)
            # The GPU-host stand-in: the model on one torch thread leaves the other core to the host
            # path, as a GPU would (other texts: the cache must not answer the second run).
            one = figures if threads_before == 1 else await _with_torch_threads(
                1, _worker_and_model(ctx, tiny, [f"{t} ~1" for t in texts], profile_seconds=0))
            worker, encode = figures["worker"], figures["encode"]
            return {
                **{key: value for key, value in figures.items() if key not in ("worker", "encode")},
                "encode": encode, "passthrough": passthrough, "worker": worker,
                "passthrough_rate": passthrough["rate"],
                "worker_over_passthrough": worker["rate"] / passthrough["rate"],
                "passthrough_cpu_ms_per_message": 1000 * passthrough["own_cores"] * passthrough["seconds"] / count,
                "one_torch_thread": {key: value for key, value in one.items() if key not in ("worker", "encode")},
                "worker_over_encode_one_thread": one["worker_over_encode"],
                "host_cpu_ms_per_message_one_thread": one["host_cpu_ms_per_message"],
                "worker_rate_one_thread": one["worker_rate"],
            }

        reps.append(await ctx.measured("overhead", unit))
    keys = ("encode_rate", "passthrough_rate", "worker_rate", "worker_over_encode", "worker_over_passthrough", "pauses",
            "cpu_ms_per_message", "passthrough_cpu_ms_per_message", "model_cpu_ms_per_message", "host_cpu_ms_per_message",
            "worker_over_encode_one_thread", "host_cpu_ms_per_message_one_thread", "worker_rate_one_thread")
    medians = {key: median([r[key] for r in reps]) for key in keys}
    profile = next((r["worker"].get("profile") for r in reps if r["worker"].get("profile")), None)
    return {
        "parameters": {
            "method": __doc__.split("\n\n", 1)[1].strip(),
            "model": {"layers": TINY["num_hidden_layers"], "hidden": TINY["hidden_size"], "random_weights_seed": 0},
            "messages": count, "device": tiny.device, "torch_threads": threads_before,
        },
        "repetitions": reps,
        "medians": medians,
        "profile": profile,
        "ratios": {"worker_over_encode": medians["worker_over_encode"], "worker_over_passthrough": medians["worker_over_passthrough"]},
        "clean_units": clean_share(reps),
        "targets": [
            target("overhead_worker_over_tiny_encode", medians["worker_over_encode"], ">=", 0.8,
                   "Worker end to end / the tiny model's encode alone, same texts"),
            target("overhead_worker_rate", medians["worker_rate"], ">=", 8000.0, "Worker end to end, msg/s, tiny model"),
            target("overhead_host_cpu_ms_per_message", medians["host_cpu_ms_per_message"], "<=", 0.12,
                   "Worker CPU per message minus the tiny model's encode CPU per message, same texts (ms)"),
            target("overhead_worker_over_tiny_encode_one_thread", medians["worker_over_encode_one_thread"], ">=", 0.7,
                   "As overhead_worker_over_tiny_encode with the model on one torch thread (the GPU-host stand-in)"),
        ],
        "table": [
            ("overhead: tiny model encode alone", f"{medians['encode_rate']:.0f} msg/s", "", None),
            ("overhead: aiokafka pass-through", f"{medians['passthrough_rate']:.0f} msg/s", "", None),
            ("overhead: worker end to end", f"{medians['worker_rate']:.0f} msg/s", "", None),
            ("overhead: worker / tiny encode", f"{medians['worker_over_encode']:.2f}", ">= 0.8", medians["worker_over_encode"] >= 0.8),
            ("overhead: worker / pass-through", f"{medians['worker_over_passthrough']:.2f}", "", None),
            ("overhead: pauses, CPU per message", f"{medians['pauses']:.0f}, {medians['cpu_ms_per_message']:.3f} ms", "", None),
            ("overhead: host CPU per message (worker - model)", f"{medians['host_cpu_ms_per_message']:.3f} ms", "<= 0.12 ms",
             medians["host_cpu_ms_per_message"] <= 0.12),
            ("overhead: worker / tiny encode, model on 1 thread", f"{medians['worker_over_encode_one_thread']:.2f}", ">= 0.7",
             medians["worker_over_encode_one_thread"] >= 0.7),
            ("overhead: host CPU per message, model on 1 thread", f"{medians['host_cpu_ms_per_message_one_thread']:.3f} ms",
             "<= 0.12 ms", medians["host_cpu_ms_per_message_one_thread"] <= 0.12),
        ],
    }
