"""The `ceiling` scenario (see `bench.registry`)."""

from __future__ import annotations

from typing import Any

from bench.common import clean_share, per_set_reps, text_sets, token_stats
from bench.harness import Context, embed_ours, encode_ceiling, median


async def ceiling(ctx: Context) -> dict[str, Any]:
    sets = text_sets(ctx)

    async def unit(texts: list[str]) -> dict[str, Any]:
        encode = encode_ceiling(ctx.embedder, texts)
        embed = embed_ours(ctx.embedder, texts)
        return {"encode": encode, "encode_rate": encode["rate"], "embed": embed, "embed_rate": embed["rate"],
                "embed_over_encode": embed["rate"] / encode["rate"]}

    reps = await per_set_reps(ctx, sets, "ceiling", unit)
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
