"""What every scenario shares: targets, noise accounting, token statistics, shipped defaults.

Scenarios import this and `bench.harness`, never each other; `bench.registry` names them all.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np

from bench.harness import Context, load_average, mixed_texts, short_texts


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


async def per_set_reps(ctx: Context, sets: dict[str, list[str]], label: str, measure: Any) -> list[dict[str, Any]]:
    """`ctx.repeat` rows of `{kind: await measure(texts)}` over the text sets, each a measured unit."""
    reps = []
    for rep in range(ctx.repeat):
        row: dict[str, Any] = {"rep": rep, "load_average": load_average()}
        for kind, texts in sets.items():
            row[kind] = await ctx.measured(f"{label} {kind}", functools.partial(measure, texts))
        reps.append(row)
    return reps


def per_set_targets(name: str, medians: dict[str, Any], sets: Any, threshold: float, description: str) -> list[dict[str, Any]]:
    """One `>=` target per text set on its median `ratio`; `description` may name `{kind}`."""
    return [target(f"{name}_{kind}", medians[kind]["ratio"], ">=", threshold, description.format(kind=kind)) for kind in sets]


def clean_share(reps: list[dict[str, Any]]) -> str:
    units = [u for r in reps for u in ([r] if "noise" in r else [v for v in r.values() if isinstance(v, dict) and "noise" in v])]
    clean = sum(1 for u in units if u["noise"]["clean"])
    return f"{clean}/{len(units)}"


def default_option(name: str) -> Any:
    from streams.config import OPTIONS

    return next(o.default for o in OPTIONS if o.name == name)


TINY = {"num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64}


def build_tiny_model(directory: str, *, seed: int = 0) -> str:
    """A SentenceTransformer with the bundled model's tokenizer and a 1-layer, 32-wide BERT of random weights."""
    import torch
    from sentence_transformers import SentenceTransformer, models
    from transformers import AutoConfig, AutoTokenizer, BertModel

    from processors.embedder import resolve_model_path

    source = resolve_model_path("all-MiniLM-L6-v2")
    config = AutoConfig.from_pretrained(source)
    for key, value in TINY.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    bert = BertModel(config)
    tokenizer = AutoTokenizer.from_pretrained(source)
    staging = Path(directory) / "hf"
    bert.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    word = models.Transformer(str(staging), max_seq_length=256)
    pooling = models.Pooling(word.get_word_embedding_dimension(), pooling_mode="mean")
    model = SentenceTransformer(modules=[word, pooling, models.Normalize()], device="cpu")
    out = Path(directory) / "tiny"
    model.save(str(out))
    return str(out)
