"""Scenario `backfill`: `embedworker migrate backfill` against the new model's own encode rate.

A collection of short texts (qdrant-edge, written by the bundled model) is copied into a new
collection by the backfill's code path (`reembed --from-collection` with the store it was
given: pages of stored texts rebuilt, embedded, written with their versions), the new model
being the bundled model cut to 128 dimensions. In the same measured unit, plain
sentence-transformers `encode` of the same weights on the same texts gives the model's own
rate. Reported: both rates and backfill / encode.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from typing import Any

from bench.common import clean_share, target
from bench.harness import Context, CpuMeter, encode_ceiling, median, on_torch_thread, short_texts

NEW_DIMENSIONS = 128


async def backfill(ctx: Context) -> dict[str, Any]:
    from processors.embedder import SentenceTransformerEmbedder
    from schemas import InputEvent
    from streams.assembly import build_pipeline, build_sink
    from streams.commands.reembed import reembed
    from streams.config import load_settings

    count = ctx.size(4000, 300)
    new_model = on_torch_thread(lambda: SentenceTransformerEmbedder(
        device=ctx.device, threads=ctx.torch_threads or None, dimensions=NEW_DIMENSIONS))
    reps = []
    for rep in range(ctx.repeat):
        texts = [f"{t} #{rep}-{i}" for i, t in enumerate(short_texts(count, seed=700 + rep))]
        path = tempfile.mkdtemp(prefix="embedworker-backfill-")
        settings = load_settings({"qdrant_path": path, "qdrant_engine": "edge", "collection": "live"}, environ={})
        store = build_sink(settings)
        try:
            pipeline = build_pipeline(settings, embedder=ctx.embedder, sink=store)
            await pipeline.start()
            for start in range(0, count, 256):
                await pipeline.process([InputEvent(id=f"doc-{start + i}", text=t) for i, t in enumerate(texts[start:start + 256])])
            await pipeline.close()

            async def unit(rep: int = rep, texts: list[str] = texts, store: Any = store, settings: Any = settings) -> dict[str, Any]:
                encode = encode_ceiling(new_model, texts, batch_size=256)
                with CpuMeter() as cpu:
                    began = time.perf_counter()
                    report = await reembed(settings.replace(dimensions=NEW_DIMENSIONS), model=settings.model,
                                           target=f"shadow-{rep}-{time.monotonic_ns()}", from_collection="live",
                                           store=store, embedder=new_model, batch_size=256)
                    seconds = time.perf_counter() - began
                assert report.embedded == count and not report.failed, report
                copied = {"seconds": seconds, "rate": count / seconds, **cpu.as_dict()}
                return {"rep": rep, "encode": encode, "backfill": copied, "encode_rate": encode["rate"],
                        "backfill_rate": copied["rate"], "backfill_over_encode": copied["rate"] / encode["rate"]}

            reps.append(await ctx.measured("backfill", unit))
        finally:
            await store.close()
            shutil.rmtree(path, ignore_errors=True)
    medians = {k: median([r[k] for r in reps]) for k in ("encode_rate", "backfill_rate", "backfill_over_encode")}
    return {
        "parameters": {"method": __doc__.split("\n\n", 1)[1].strip(), "documents": count, "store": "qdrant-edge",
                       "new_model": f"bundled, {NEW_DIMENSIONS} dimensions", "device": new_model.device},
        "repetitions": reps,
        "medians": medians,
        "ratios": {"backfill_over_encode": medians["backfill_over_encode"]},
        "clean_units": clean_share(reps),
        "targets": [target("backfill_over_encode", medians["backfill_over_encode"], ">=", 0.6,
                           "migrate backfill (read, embed, write) / the new model's own encode, same texts")],
        "table": [
            ("backfill: new model's encode", f"{medians['encode_rate']:.0f} texts/s", "", None),
            ("backfill: copy with the new model", f"{medians['backfill_rate']:.0f} docs/s", "", None),
            ("backfill / encode", f"{medians['backfill_over_encode']:.2f}", ">= 0.6", medians["backfill_over_encode"] >= 0.6),
        ],
    }
