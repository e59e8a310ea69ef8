"""Writes follow launch order: the real `Pipeline` and the real (in-memory) Qdrant engine.

The model and the cache are stand-ins here (no I/O, deterministic vectors, gates that decide
which batch waits), so that each race of issue 11 is forced rather than hoped for; the
integration tests in test_mirror.py run the same property with the real model and Redis.
"""

from __future__ import annotations

import asyncio
import random
import threading
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, settings as hsettings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule

from processors.chunking import plan_chunks
from processors.ordering import Sequencer
from processors.pipeline import Pipeline, PipelineHooks
from processors.sink import QdrantSink
from schemas import InputEvent, content_hash, point_id
from doubles import GatedCache, WordEmbedder, vector_of
from support import unique, until

def prepared_signal() -> tuple[PipelineHooks, list[int]]:
    """`on_cache` is the last thing a batch does before it waits for its turn to write."""
    seen: list[int] = []
    return PipelineHooks(on_cache=lambda redis, batch, misses: seen.append(1)), seen


async def stored(sink: QdrantSink, doc_id: str) -> list[Any]:
    return sorted((p for p in await sink.points() if p.payload["id"] == doc_id), key=lambda p: p.payload["chunk_index"])


async def test_a_cached_newer_version_is_not_overwritten_by_an_older_miss():
    sink, cache = QdrantSink(collection=unique("o")), GatedCache()
    hooks, prepared = prepared_signal()
    pipeline = Pipeline(embedder=WordEmbedder(), sink=sink, cache=cache, hooks=hooks)
    await pipeline.start()
    cache.values[content_hash("words", "v2")] = vector_of("v2")
    gate = cache.get_gates[content_hash("words", "v1")] = asyncio.Event()
    older = asyncio.create_task(pipeline.process([InputEvent("x", "v1")]))
    newer = asyncio.create_task(pipeline.process([InputEvent("x", "v2")]))
    await until(lambda: len(prepared) == 1, "the newer batch to be ready to write")
    gate.set()
    outcomes = await asyncio.gather(older, newer)
    points = await stored(sink, "x")
    assert [p.payload["text"] for p in points] == ["v2"]
    assert float(np.dot(points[0].vector, vector_of("v2"))) > 0.999
    assert outcomes[1][0].result.cached and not outcomes[0][0].result.cached


async def test_same_text_with_new_metadata_keeps_the_new_metadata():
    sink, cache = QdrantSink(collection=unique("o")), GatedCache()
    hooks, prepared = prepared_signal()
    pipeline = Pipeline(embedder=WordEmbedder(), sink=sink, cache=cache, hooks=hooks)
    await pipeline.start()
    # The older batch embeds the text, then hangs in the cache fill; the newer one takes the
    # vector from it (in-flight dedupe) and is ready to write first.
    gate = cache.set_gates[content_hash("words", "same text")] = asyncio.Event()
    older = asyncio.create_task(pipeline.process([InputEvent("x", "same text", {"v": 1})]))
    newer = asyncio.create_task(pipeline.process([InputEvent("x", "same text", {"v": 2})]))
    await until(lambda: len(prepared) == 1, "the newer batch to be ready to write")
    gate.set()
    await asyncio.gather(older, newer)
    assert [p.payload["metadata"] for p in await stored(sink, "x")] == [{"v": 2}]


async def test_a_poison_text_in_the_older_batch_does_not_let_the_newer_pass():
    sink = QdrantSink(collection=unique("o"))
    hooks, prepared = prepared_signal()
    embedder = WordEmbedder()
    pipeline = Pipeline(embedder=embedder, sink=sink, hooks=hooks)
    await pipeline.start()
    embedder.gate = threading.Event()  # the older batch's single-text rounds wait for the newer batch
    older = asyncio.create_task(pipeline.process([InputEvent("x", "v1"), InputEvent("p", "POISON")]))
    await until(lambda: len(embedder.calls) >= 1, "the older batch to embed")
    newer = asyncio.create_task(pipeline.process([InputEvent("x", "v2 v2")]))
    embedder.gate.set()  # set at once: the single executor thread runs the rounds in submission order
    first, second = await asyncio.gather(older, newer)
    assert first[1].error_kind == "embed_failed" and first[0].result is not None
    assert [p.payload["text"] for p in await stored(sink, "x")] == ["v2 v2"]


async def test_an_abandoned_turn_still_waits_for_the_turns_before_it():
    order: list[str] = []
    sequencer = Sequencer()
    first, second, third = sequencer.take(), sequencer.take(), sequencer.take()
    second.end()  # abandoned before it ever waited

    async def run(turn, name):
        async with turn:
            order.append(name)

    late = asyncio.create_task(run(third, "third"))
    await asyncio.sleep(0)
    assert order == [] and not late.done()
    await run(first, "first")
    await late
    assert order == ["first", "third"]


async def test_fenced_events_are_never_written():
    sink = QdrantSink(collection=unique("o"))
    pipeline = Pipeline(embedder=WordEmbedder(), sink=sink)
    await pipeline.start()
    events = [InputEvent("kept", "a"), InputEvent("gone", "b")]
    await pipeline.process(events, live=lambda i: events[i].id == "kept")
    assert sorted(p.payload["id"] for p in await sink.points()) == ["kept"]


def test_chunks_fit_cover_the_text_and_prefer_sentence_ends():
    text = "One two three four. Five six seven eight nine.\n\nTen eleven twelve thirteen fourteen fifteen sixteen."
    spans = WordEmbedder().token_offsets([text])[0]
    chunks = plan_chunks(text, spans, max_tokens=8, overlap_tokens=2)
    assert all(c.tokens <= 8 for c in chunks)
    assert chunks[0].text == "One two three four."  # the sentence end beats filling up to 8 words
    assert chunks[1].text.startswith("three four.")  # 2 tokens of overlap
    assert chunks[-1].text.endswith("sixteen.")
    covered = set()
    for c in chunks:
        assert text[c.start : c.end] == c.text
        covered.update(range(c.start, c.end))
    assert covered >= {i for i, ch in enumerate(text) if not ch.isspace()}
    assert plan_chunks("short text", [(0, 5), (6, 10)], max_tokens=8)[0].text == "short text"


# ---- the state machine: random writes, random cache latency, several batches in flight -------


class _SlowDictCache(GatedCache):
    def __init__(self, rng: random.Random) -> None:
        super().__init__()
        self.rng = rng

    async def get_many(self, hashes, dim):
        await asyncio.sleep(self.rng.uniform(0, 0.003))  # injected latency: lets batches overtake each other
        return await super().get_many(hashes, dim)

    async def set_many(self, items):
        await asyncio.sleep(self.rng.uniform(0, 0.003))
        await super().set_many(items)


IDS = [f"d{i}" for i in range(6)]
WORDS = ["alpha", "beta", "gamma", "delta", "eps.", "zeta", "eta", "theta."]


class MirrorMachine(RuleBasedStateMachine):
    """Events go into batches launched concurrently; after each settle the store equals the model."""

    @initialize(seed=st.integers(0, 2**16), engine=st.sampled_from(["local", "edge"]))
    def start(self, seed: int, engine: str) -> None:
        import tempfile

        from processors.edge_sink import EdgeSink

        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        self.rng = random.Random(seed)
        if engine == "edge":
            self.sink = EdgeSink(collection=unique("m"), path=tempfile.mkdtemp(prefix="mirror-"))
        else:
            self.sink = QdrantSink(collection=unique("m"))
        self.embedder = WordEmbedder(max_tokens=6)
        self.pipeline = Pipeline(embedder=self.embedder, sink=self.sink, cache=_SlowDictCache(self.rng), chunk_overlap_tokens=1)
        self.loop.run_until_complete(self.pipeline.start())
        self.model: dict[str, tuple[str, dict[str, Any]] | None] = {}
        self.batch: list[InputEvent] = []
        self.tasks: list[asyncio.Task[Any]] = []

    @rule(doc=st.sampled_from(IDS), words=st.integers(1, 14), version=st.integers(0, 3))
    def upsert(self, doc: str, words: int, version: int) -> None:
        text = " ".join(self.rng.choice(WORDS) for _ in range(words))
        event = InputEvent(doc, text, {"v": version})
        self.batch.append(event)
        self.model[doc] = (text, event.metadata)

    @rule(doc=st.sampled_from(IDS))
    def same_text_new_metadata(self, doc: str) -> None:
        if self.model.get(doc):
            text, metadata = self.model[doc]  # type: ignore[misc]
            event = InputEvent(doc, text, {"v": metadata.get("v", 0) + 10})
            self.batch.append(event)
            self.model[doc] = (text, event.metadata)

    @rule(doc=st.sampled_from(IDS))
    def delete(self, doc: str) -> None:
        self.batch.append(InputEvent(doc, "", op="delete"))
        self.model[doc] = None

    @precondition(lambda self: bool(self.batch))
    @rule()
    def launch(self) -> None:
        events, self.batch = self.batch, []
        turn_taken = self.loop.run_until_complete(self._take_turn())
        self.tasks.append(self.loop.create_task(self.pipeline.process(events, turn=turn_taken)))

    async def _take_turn(self):
        return self.pipeline.take_turn()

    @precondition(lambda self: len(self.tasks) >= 3)  # several batches in flight, or the race cannot happen
    @rule()
    def settle(self) -> None:
        self.check()

    def check(self) -> None:
        if self.batch:
            self.launch()
        self.loop.run_until_complete(asyncio.gather(*self.tasks))
        self.tasks.clear()
        points = self.loop.run_until_complete(self.sink.points())
        by_doc: dict[str, list[Any]] = {}
        for p in points:
            by_doc.setdefault(p.payload["id"], []).append(p)
        for doc in IDS:
            expected = self.model.get(doc)
            got = sorted(by_doc.get(doc, []), key=lambda p: p.payload["chunk_index"])
            if expected is None:
                assert got == [], f"{doc} was deleted but holds {len(got)} points"
                continue
            text, metadata = expected
            spans = self.embedder.token_offsets([text])[0]
            chunks = plan_chunks(text, spans, max_tokens=4, overlap_tokens=1)
            assert [p.payload["chunk_index"] for p in got] == list(range(len(chunks))), doc
            assert all(p.payload["metadata"] == metadata for p in got), doc
            assert all(p.id == point_id(doc, i) for i, p in enumerate(got))
            for p, chunk in zip(got, chunks):
                assert float(np.dot(p.vector, vector_of(chunk.text))) > 0.999, doc

    def teardown(self) -> None:
        if hasattr(self, "loop"):
            try:
                self.check()
            finally:
                self.loop.run_until_complete(asyncio.gather(*self.tasks, return_exceptions=True))
            self.loop.run_until_complete(self.pipeline.close())
            self.loop.run_until_complete(self.sink.close())
            self.loop.close()
            asyncio.set_event_loop(None)


MirrorMachine.TestCase.settings = hsettings(
    max_examples=60, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@pytest.mark.filterwarnings("ignore")
def test_store_mirrors_the_stream_state_machine():
    # Run in a thread: pytest-asyncio keeps a loop running in the main thread.
    failures: list[BaseException] = []

    def run() -> None:
        try:
            MirrorMachine.TestCase("runTest").runTest()
        except BaseException as exc:  # noqa: BLE001  (re-raised below)
            failures.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if failures:
        raise failures[0]
