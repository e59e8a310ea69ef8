"""The small options around a model change: cut vectors (Matryoshka) and quantized collections.

The real bundled model; every embedded engine (qdrant-client in memory and on a path, qdrant-edge).
"""

from __future__ import annotations

import numpy as np
import pytest

from processors.embedder import SentenceTransformerEmbedder
from processors.errors import SinkConfigError
from processors.pipeline import Pipeline
from schemas import InputEvent
from streams.assembly import build_embedder, build_sink
from streams.config import ConfigError, load_settings
from support import STORE_KINDS, make_store

TEXTS = ["Reset a password in the settings page.", "Invoices are generated on the first business day.", "東京の天気"]


@pytest.fixture(scope="module")
def cut() -> SentenceTransformerEmbedder:
    return SentenceTransformerEmbedder(device="cpu", dimensions=128)


def test_cut_vectors_are_the_first_values_normalized_again(embedder, cut):
    full = embedder.embed(TEXTS).vectors
    short = cut.embed(TEXTS).vectors
    assert cut.dim == 128 and short.shape == (3, 128)
    want = full[:, :128] / np.linalg.norm(full[:, :128], axis=1, keepdims=True)
    assert np.allclose(short, want, atol=1e-5)
    assert np.allclose(np.linalg.norm(short, axis=1), 1.0, atol=1e-5)
    assert cut.version != embedder.version and cut.version.endswith("+dim128")


def test_more_dimensions_than_the_model_has_is_refused():
    with pytest.raises(ValueError, match="between 1 and the model's 384"):
        SentenceTransformerEmbedder(device="cpu", dimensions=385)


def test_the_setting_reaches_the_local_embedder_and_the_range_is_checked(cut):
    assert build_embedder(load_settings({"dimensions": 128}, environ={})).dim == 128
    with pytest.raises(ConfigError):
        load_settings({"dimensions": 70_000}, environ={})


@pytest.mark.parametrize("kind", STORE_KINDS)
async def test_a_collection_of_cut_vectors_refuses_the_full_model(kind, tmp_path, embedder, cut):
    sink = make_store(kind, tmp_path)
    pipeline = Pipeline(embedder=cut, sink=sink)
    try:
        await pipeline.start()
        await pipeline.process([InputEvent(id=f"d{i}", text=t) for i, t in enumerate(TEXTS)])
        assert await sink.vector_size() == 128
        with pytest.raises(SinkConfigError, match="size 128"):
            await sink.ensure_collection(embedder.dim, model=embedder.name, model_version=embedder.version)
    finally:
        await pipeline.close()
        await sink.close()


@pytest.mark.parametrize("quantization", ["int8", "binary"])
async def test_a_new_collection_gets_the_quantization_asked_for(tmp_path, embedder, quantization):
    # qdrant-edge records it in the shard's config (qdrant-client's local engine has no quantization:
    # it takes the setting and ignores it; a server applies it).
    settings = load_settings({"qdrant_path": str(tmp_path / "q"), "qdrant_engine": "edge", "quantization": quantization,
                              "collection": "quantized"}, environ={})
    sink = build_sink(settings)
    pipeline = Pipeline(embedder=embedder, sink=sink)
    try:
        await pipeline.start()
        await pipeline.process([InputEvent(id=f"d{i}", text=t) for i, t in enumerate(TEXTS)])
        hits = await sink.search(embedder.embed([TEXTS[0]]).vectors[0], limit=1)
        assert hits[0].payload["id"] == "d0"
        assert quantization_of(sink) == quantization
    finally:
        await pipeline.close()
        await sink.close()


def quantization_of(sink) -> str | None:
    """What the shard's own config says of its dense vectors."""
    import json
    from pathlib import Path

    config = json.loads((Path(sink._dir()) / "edge_config.json").read_text())["vectors"][""].get("quantization_config") or {}
    return "int8" if config.get("scalar", {}).get("type") == "int8" else "binary" if "binary" in config else None


def test_an_unknown_quantization_is_refused():
    with pytest.raises(ConfigError):
        load_settings({"quantization": "pq"}, environ={})
