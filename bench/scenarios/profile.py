"""The `profile` scenario (see `bench.registry`)."""

from __future__ import annotations

import time
from typing import Any

from bench.common import token_stats
from bench.harness import Context, CpuMeter, RssSampler, load_average, median, mixed_texts, on_torch_thread, trim_memory


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
