"""Versioned collections behind an alias: the base of a model change without downtime.

With `EMBEDWORKER_VERSIONED_COLLECTIONS`, a new collection is `<name>__<model>__1` behind the
alias `<name>`, which every read and write goes through; qdrant-edge, which has no aliases, keeps
its own record. Every embedded engine, the real model.
"""

from __future__ import annotations

import json
import os

import pytest

from processors.edge_sink import ALIASES_FILE, read_aliases
from processors.pipeline import Pipeline
from processors.sink import versioned_collection
from schemas import InputEvent
from streams.assembly import build_sink
from streams.config import load_settings

TEXTS = ["Reset a password in the settings page.", "Invoices are generated on the first business day."]


def settings_for(tmp_path, engine: str, **overrides):
    return load_settings({"qdrant_path": str(tmp_path / "q"), "qdrant_engine": engine, "collection": "texts",
                          "versioned_collections": True, **overrides}, environ={})


async def write(settings, embedder, texts) -> None:
    sink = build_sink(settings)
    pipeline = Pipeline(embedder=embedder, sink=sink)
    try:
        await pipeline.start()
        await pipeline.process([InputEvent(id=f"d{i}", text=t) for i, t in enumerate(texts)])
    finally:
        await pipeline.close()
        await sink.close()


async def stored_ids(settings) -> list[str]:
    sink = build_sink(settings)
    try:
        await sink.vector_size()
        return sorted(p.payload["id"] for p in await sink.points(with_vectors=False))
    finally:
        await sink.close()


def target_of(settings) -> str | None:
    """Where the alias points, as the engine itself records it."""
    if settings.qdrant_engine == "edge":
        return read_aliases(settings.qdrant_path).get(settings.collection)
    from qdrant_client import QdrantClient

    client = QdrantClient(path=settings.qdrant_path)
    try:
        return next((a.collection_name for a in client.get_aliases().aliases if a.alias_name == settings.collection), None)
    finally:
        client.close()


def test_the_versioned_name_is_the_alias_the_model_and_a_number():
    assert versioned_collection("texts", "all-MiniLM-L6-v2") == "texts__all-minilm-l6-v2__1"
    assert versioned_collection("texts", "/tmp/models/My Model/", 2) == "texts__my-model__2"
    assert versioned_collection("texts", None) == "texts__model__1"


@pytest.mark.parametrize("engine", ["local", "edge"])
async def test_a_new_collection_is_created_behind_the_alias_and_found_again(tmp_path, embedder, engine):
    settings = settings_for(tmp_path, engine)
    await write(settings, embedder, TEXTS)
    assert target_of(settings) == "texts__all-minilm-l6-v2__1"
    await write(settings, embedder, TEXTS[:1])  # a restart: the alias is found, nothing new is created
    assert target_of(settings) == "texts__all-minilm-l6-v2__1"
    assert await stored_ids(settings) == ["d0", "d1"]
    if engine == "edge":
        assert sorted(os.listdir(settings.qdrant_path)) == [ALIASES_FILE, "texts__all-minilm-l6-v2__1"]


@pytest.mark.parametrize("engine", ["local", "edge"])
async def test_an_existing_plain_collection_keeps_working(tmp_path, embedder, engine):
    await write(settings_for(tmp_path, engine, versioned_collections=False), embedder, TEXTS)
    settings = settings_for(tmp_path, engine)
    await write(settings, embedder, TEXTS[:1])
    assert target_of(settings) is None
    assert await stored_ids(settings) == ["d0", "d1"]


async def test_an_edge_start_that_crashed_before_recording_the_alias_finds_its_shard(tmp_path, embedder):
    settings = settings_for(tmp_path, "edge")
    await write(settings, embedder, TEXTS)
    os.remove(os.path.join(settings.qdrant_path, ALIASES_FILE))  # as if killed between the shard and the record
    await write(settings, embedder, TEXTS[1:])
    assert target_of(settings) == "texts__all-minilm-l6-v2__1"
    assert await stored_ids(settings) == ["d0", "d1"]


async def test_a_damaged_edge_alias_record_is_a_clear_error(tmp_path, embedder):
    settings = settings_for(tmp_path, "edge")
    await write(settings, embedder, TEXTS)
    with open(os.path.join(settings.qdrant_path, ALIASES_FILE), "w", encoding="utf-8") as f:
        json.dump(["not", "a", "record"], f)
    from processors.errors import SinkConfigError

    with pytest.raises(SinkConfigError, match="not an alias record"):
        await write(settings, embedder, TEXTS)
