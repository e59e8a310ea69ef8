"""Scenario `tenancy`: what the tenant layer costs the pipeline.

The same short texts go through the Worker twice in one measured unit, with the bundled model:
as native events, and with `EMBEDWORKER_TENANT_FROM=tenant` over 50 tenants (the payload
layout: the tenant read from the event, scoped point ids and cache keys, the tenant field,
fair batching and per-tenant metrics). Reported: both rates and tenants / native.
"""

from __future__ import annotations

from typing import Any, Sequence

import orjson

from bench.common import clean_share, target
from bench.harness import Context, median, run_worker_backlog, short_texts

TENANTS = 50


def tenant_events(texts: Sequence[str], prefix: str, ids: Sequence[str] | None = None) -> list[bytes]:
    ids = ids if ids is not None else [f"{prefix}-{i}" for i in range(len(texts))]
    return [orjson.dumps({"id": doc_id, "text": t, "metadata": {"n": i}, "tenant": f"t{i % TENANTS:02d}"})
            for i, (doc_id, t) in enumerate(zip(ids, texts))]


async def tenancy(ctx: Context) -> dict[str, Any]:
    count = ctx.size(3000, 300)
    reps = []
    for rep in range(ctx.repeat):
        texts = [f"{t} #{rep}-{i}" for i, t in enumerate(short_texts(count, seed=300 + rep))]

        async def unit(texts: list[str] = texts) -> dict[str, Any]:
            # Same-length markers: each arm embeds texts of the same token counts, never the other's (no cache hits).
            native = await run_worker_backlog(ctx, [f"{t} (n)" for t in texts])
            tenants = await run_worker_backlog(ctx, [f"{t} (t)" for t in texts], settings_overrides={"tenant_from": "tenant"},
                                               encode=tenant_events)
            for run in (native, tenants):
                run.pop("_embed_calls", None)
                assert run["dead_letters"] == 0, run
            return {"native": native, "tenants": tenants, "native_rate": native["rate"], "tenants_rate": tenants["rate"],
                    "tenants_over_native": tenants["rate"] / native["rate"]}

        reps.append(await ctx.measured("tenancy", unit))
    medians = {k: median([r[k] for r in reps]) for k in ("native_rate", "tenants_rate", "tenants_over_native")}
    return {
        "parameters": {"method": __doc__.split("\n\n", 1)[1].strip(), "messages": count, "tenants": TENANTS},
        "repetitions": reps,
        "medians": medians,
        "ratios": {"tenants_over_native": medians["tenants_over_native"]},
        "clean_units": clean_share(reps),
        "targets": [target("tenancy_over_native", medians["tenants_over_native"], ">=", 0.9,
                           "Worker with 50 tenants (payload layout) / native events, bundled model")],
        "table": [
            ("tenancy: native events", f"{medians['native_rate']:.0f} msg/s", "", None),
            ("tenancy: 50 tenants / native", f"{medians['tenants_over_native']:.2f}", ">= 0.9", medians["tenants_over_native"] >= 0.9),
        ],
    }
