"""Scenario `chunking`: long documents as chunks, end to end, against the model on the same chunks.

Documents of 3 to 12 paragraphs of the corpus (most over the model's 256 tokens) go
through the Worker with `EMBEDWORKER_LONG_TEXT=chunk` (the default); in the same measured
unit, the model's `encode` (bs 32) embeds exactly the chunks the worker stored. Reported:
documents/s and chunks/s of the worker, chunks/s of the model alone, and their ratio.
"""

from __future__ import annotations

import random
import time
from typing import Any

from bench.common import clean_share, target
from bench.harness import Context, CpuMeter, median, on_torch_thread, run_worker_backlog, warm_pipeline


def long_documents(n: int, seed: int) -> list[str]:
    from streams import corpus

    rng = random.Random(seed)
    return [f"Document {i}.\n\n" + "\n\n".join(corpus.text(rng, rng.randint(3, 8)) for _ in range(rng.randint(3, 12)))
            for i in range(n)]


def chunks_of(ctx: Context, documents: list[str]) -> list[str]:
    from processors.chunking import plan_chunks
    from schemas import normalize_text

    embedder = ctx.embedder
    limit = embedder.max_tokens - embedder.special_tokens
    texts = [normalize_text(d) for d in documents]
    offsets = embedder.token_offsets(texts)
    return [c.text for text, spans in zip(texts, offsets) for c in plan_chunks(text, spans, max_tokens=limit, overlap_tokens=32)]


async def chunking(ctx: Context) -> dict[str, Any]:

    documents = long_documents(ctx.size(300, 16), seed=808)
    chunks = chunks_of(ctx, documents)
    await warm_pipeline(ctx)
    reps = []
    for rep in range(ctx.repeat):
        async def unit() -> dict[str, Any]:
            def encode() -> dict[str, Any]:
                with CpuMeter() as cpu:
                    started = time.perf_counter()
                    ctx.embedder._model.encode(chunks, batch_size=32, normalize_embeddings=True, show_progress_bar=False)
                    seconds = time.perf_counter() - started
                return {"seconds": seconds, "rate": len(chunks) / seconds, **cpu.as_dict()}

            ceiling = on_torch_thread(encode)
            run = await run_worker_backlog(ctx, [f"{d} (rep {rep})" for d in documents])
            run.pop("_embed_calls", None)
            worker_chunks = run["texts_embedded"]
            return {"ceiling": ceiling, "worker": run, "documents_rate": run["rate"],
                    "chunks_rate": worker_chunks / run["seconds"], "ceiling_chunks_rate": ceiling["rate"],
                    "chunks_over_ceiling": (worker_chunks / run["seconds"]) / ceiling["rate"], "chunks_embedded": worker_chunks}
        reps.append({"rep": rep, **await ctx.measured("chunking", unit)})
    keys = ("documents_rate", "chunks_rate", "ceiling_chunks_rate", "chunks_over_ceiling")
    medians = {k: median([r[k] for r in reps]) for k in keys}
    return {
        "parameters": {"method": __doc__.split("\n\n", 1)[1].strip(), "documents": len(documents), "chunks": len(chunks),
                       "chunks_per_document": len(chunks) / len(documents)},
        "repetitions": reps,
        "medians": medians,
        "ratios": {"chunks_over_ceiling": medians["chunks_over_ceiling"]},
        "clean_units": clean_share(reps),
        "targets": [target("chunking_chunks_over_ceiling", medians["chunks_over_ceiling"], ">=", 0.8,
                           "Worker chunks/s / model.encode(bs=32) on the same chunks")],
        "table": [
            ("chunking: documents/s, chunks/s", f"{medians['documents_rate']:.1f}, {medians['chunks_rate']:.0f}", "", None),
            ("chunking: model alone on the chunks", f"{medians['ceiling_chunks_rate']:.0f} chunks/s", "", None),
            ("chunking: worker / model on the same chunks", f"{medians['chunks_over_ceiling']:.2f}", ">= 0.8",
             medians["chunks_over_ceiling"] >= 0.8),
        ],
    }
