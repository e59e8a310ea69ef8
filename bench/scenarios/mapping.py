"""Scenario `mapping`: what reading events as they are costs the worker end to end.

The same texts reach the Worker three ways, each arm a full run on the same tiny model the
`overhead` scenario builds (1 layer, width 32: the host path is what is timed, not the model):
- `native`: `{"id", "text", "metadata"}`, the default mapping (decoded by `decode_input`);
- `flat`: `{"doc_id", "body", "lang", "n"}` with `ID_FROM=doc_id TEXT_FROM=body METADATA_FROM=lang,n`;
- `debezium`: Debezium change events (`op: c`, the row in `after`, `source.lsn`), half of them
  in the schema envelope, `INPUT_FORMAT=debezium TEXT_FROM=body METADATA_FROM=lang,n`.
The text each arm embeds is the same, so the ratios to `native` are the mapping's cost.
"""

from __future__ import annotations

import tempfile
from typing import Any, Sequence

import orjson

from bench.common import build_tiny_model, clean_share, target
from bench.harness import Context, median, on_torch_thread, run_worker_backlog, short_texts

ARMS = {
    "native": {},
    "flat": {"id_from": "doc_id", "text_from": "body", "metadata_from": "lang,n"},
    "debezium": {"input_format": "debezium", "text_from": "body", "metadata_from": "lang,n"},
}


def _ids(texts: Sequence[str], prefix: str, ids: Sequence[str] | None) -> Sequence[str]:
    return ids if ids is not None else [f"{prefix}-{i}" for i in range(len(texts))]


def flat_events(texts: Sequence[str], prefix: str, ids: Sequence[str] | None = None) -> list[bytes]:
    return [orjson.dumps({"doc_id": doc_id, "body": t, "lang": "en", "n": i}) for i, (doc_id, t) in enumerate(zip(_ids(texts, prefix, ids), texts))]


def debezium_events(texts: Sequence[str], prefix: str, ids: Sequence[str] | None = None) -> list[bytes]:
    out = []
    for i, (doc_id, text) in enumerate(zip(_ids(texts, prefix, ids), texts)):
        change = {"before": None, "after": {"id": doc_id, "body": text, "lang": "en", "n": i}, "op": "c",
                  "source": {"connector": "postgresql", "db": "app", "table": "docs", "lsn": 1_000_000 + 8 * i, "ts_ms": 1_733_000_000_000 + i},
                  "ts_ms": 1_733_000_000_000 + i}
        out.append(orjson.dumps({"schema": {"type": "struct", "name": "app.public.docs.Envelope"}, "payload": change} if i % 2 else change))
    return out


ENCODERS = {"native": None, "flat": flat_events, "debezium": debezium_events}


async def mapping(ctx: Context) -> dict[str, Any]:
    from processors.embedder import SentenceTransformerEmbedder

    count = ctx.size(12_000, 1_000)
    path = on_torch_thread(build_tiny_model, tempfile.mkdtemp(prefix="embedworker-tiny-"))
    tiny = SentenceTransformerEmbedder(model=path, device=ctx.device, threads=ctx.torch_threads or None)
    reps = []
    for rep in range(ctx.repeat):
        texts = [f"{t} #{rep}-{i}" for i, t in enumerate(short_texts(count, seed=900 + rep))]  # unique: no cache hits

        async def unit(texts: list[str] = texts) -> dict[str, Any]:
            runs = {arm: await run_worker_backlog(ctx, texts, embedder=tiny, settings_overrides=ARMS[arm], encode=ENCODERS[arm])
                    for arm in ARMS}
            for run in runs.values():
                run.pop("_embed_calls", None)
                assert run["dead_letters"] == 0, run
            row: dict[str, Any] = {arm: run for arm, run in runs.items()}
            for arm in ("flat", "debezium"):
                row[f"{arm}_over_native"] = runs[arm]["rate"] / runs["native"]["rate"]
            return row

        reps.append(await ctx.measured("mapping", unit))
    medians = {key: median([r[key] for r in reps]) for key in ("flat_over_native", "debezium_over_native")}
    medians.update({f"{arm}_rate": median([r[arm]["rate"] for r in reps]) for arm in ARMS})
    return {
        "parameters": {"method": __doc__.split("\n\n", 1)[1].strip(), "messages": count, "arms": ARMS, "device": tiny.device},
        "repetitions": reps,
        "medians": medians,
        "ratios": {"flat_over_native": medians["flat_over_native"], "debezium_over_native": medians["debezium_over_native"]},
        "clean_units": clean_share(reps),
        "targets": [
            target("mapping_flat_over_native", medians["flat_over_native"], ">=", 0.9, "Worker on mapped flat events / on native events, tiny model"),
            target("mapping_debezium_over_native", medians["debezium_over_native"], ">=", 0.9, "Worker on Debezium events / on native events, tiny model"),
        ],
        "table": [
            ("mapping: native events", f"{medians['native_rate']:.0f} msg/s", "", None),
            ("mapping: flat, mapped / native", f"{medians['flat_over_native']:.2f}", ">= 0.9", medians["flat_over_native"] >= 0.9),
            ("mapping: Debezium / native", f"{medians['debezium_over_native']:.2f}", ">= 0.9", medians["debezium_over_native"] >= 0.9),
        ],
    }
