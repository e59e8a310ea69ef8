"""The pipeline with the real model, a real Redis and the real Qdrant engine (no Kafka)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from processors.cache import RedisCache
from doubles import FailingSink, PoisonEmbedder
from processors.pipeline import Backoff, Pipeline
from processors.errors import SinkConfigError
from processors.sink import QdrantSink
from schemas import InputEvent, InvalidEvent, decode_input, point_id
from support import unique
from support import retrieve

# ---- the decoder never raises anything but InvalidEvent -------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


@hsettings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_arbitrary_bytes_decode_or_fail_cleanly(raw):
    try:
        event = decode_input(raw)
    except InvalidEvent as exc:
        assert exc.kind and exc.message
    else:
        assert isinstance(event.id, str) and (event.is_delete or event.text.strip())


@hsettings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(json_values, st.one_of(st.none(), json_values), st.one_of(st.none(), json_values))
def test_arbitrary_json_decodes_or_fails_cleanly(extra, event_id, text):
    import orjson

    body = {"extra": extra}
    if event_id is not None:
        body["id"] = event_id
    if text is not None:
        body["text"] = text
    try:
        raw = orjson.dumps(body)
    except (orjson.JSONEncodeError, TypeError):
        return  # not representable as JSON (e.g. huge ints): the bytes test covers raw input
    try:
        event = decode_input(raw)
    except InvalidEvent:
        return
    assert event.id == event_id and event.text == text


# ---- the pipeline with real parts -----------------------------------------------------------


@pytest.fixture
def sink():
    return QdrantSink(collection=unique("p"))


async def test_one_outcome_per_event_for_arbitrary_texts(embedder, sink):
    pipeline = Pipeline(embedder=embedder, sink=sink)
    await pipeline.start()

    @hsettings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(st.lists(st.tuples(st.sampled_from(["a", "b", "c", "d"]), st.text(min_size=1, max_size=300)), min_size=1, max_size=12))
    def run(pairs):
        events = [InputEvent(id=i, text=t) for i, t in pairs if t.strip() and "\x00" not in t]
        if not events:
            return
        import asyncio

        outcomes = asyncio.run_coroutine_threadsafe(pipeline.process(events), loop).result(120)
        assert [o.event for o in outcomes] == events
        assert all(o.result is not None for o in outcomes)

    import asyncio
    import threading

    loop = asyncio.get_running_loop()
    thread = threading.Thread(target=run)
    thread.start()
    while thread.is_alive():
        await asyncio.sleep(0.05)  # keep the loop serving the pipeline while hypothesis runs
    thread.join()
    await pipeline.close()


async def test_truncation_is_reported_from_token_counts(embedder, sink, services):
    cache = RedisCache(url=services.redis_url, prefix=f"test:{unique('trunc')}:")
    pipeline = Pipeline(embedder=embedder, sink=sink, cache=cache, long_text="truncate")
    await pipeline.start()
    long_text = " ".join(["embedding"] * 600)
    outcomes = await pipeline.process([InputEvent("short", "a short text"), InputEvent("long", long_text)])
    assert [o.result.truncated for o in outcomes] == [False, True]
    # A cache hit keeps the fact.
    cached = await pipeline.process([InputEvent("long-again", long_text)])
    assert cached[0].result.cached and cached[0].result.truncated


async def test_poison_text_is_isolated_and_the_rest_go_through(embedder, sink):
    poisoned = PoisonEmbedder(embedder)
    pipeline = Pipeline(embedder=poisoned, sink=sink)
    await pipeline.start()
    events = [InputEvent(f"e{i}", f"ordinary text number {i}") for i in range(7)] + [InputEvent("bad", "this is POISON")]
    outcomes = await pipeline.process(events)
    assert [o.error_kind for o in outcomes] == [None] * 7 + ["embed_failed"]
    assert "InjectedFault" in outcomes[-1].error_message
    assert await sink.count() == 7


async def test_transient_model_failure_is_retried(embedder, sink):
    flaky = PoisonEmbedder(embedder, fail_first_calls=1)
    pipeline = Pipeline(embedder=flaky, sink=sink)
    await pipeline.start()
    outcomes = await pipeline.process([InputEvent("a", "alpha"), InputEvent("b", "beta")])
    assert all(o.result is not None for o in outcomes) and flaky.calls == 2


async def test_failing_sink_is_retried_until_it_recovers(embedder, sink):
    failing = FailingSink(sink)
    failing.fail_next = 3
    pipeline = Pipeline(embedder=embedder, sink=failing, sink_backoff=Backoff(base_seconds=0.01, cap_seconds=0.05))
    await pipeline.start()
    outcomes = await pipeline.process([InputEvent("a", "alpha")])
    assert outcomes[0].result is not None and failing.failed_calls == 3
    assert await sink.count() == 1


async def test_dimension_mismatch_is_a_clear_error(embedder):
    sink = QdrantSink(collection=unique("dim"))
    await sink.ensure_collection(10)
    with pytest.raises(SinkConfigError, match="size 10.*384"):
        await Pipeline(embedder=embedder, sink=sink).start()


async def test_redis_outage_degrades_to_no_cache(embedder, sink, services):
    errors: list[str] = []
    cache = RedisCache(url="redis://127.0.0.1:1/0", timeout_seconds=0.2, on_error=errors.append)
    pipeline = Pipeline(embedder=embedder, sink=sink, cache=cache)
    await pipeline.start()
    outcomes = await pipeline.process([InputEvent("a", "alpha"), InputEvent("b", "alpha")])
    assert all(o.result is not None for o in outcomes)
    assert errors == ["get", "set"]
    points = await retrieve(sink, [point_id("a")])
    expected = embedder.embed(["alpha"]).vectors[0]
    assert float(np.dot(points[point_id("a")][0], expected)) > 0.999


async def test_cache_writes_expire_and_a_redis_refusing_scripts_still_gets_them(services, caplog):
    """A batch's entries go in one script call, each with the TTL; a user whose ACL refuses
    scripting (managed Redis often does) gets the same entries as a pipeline of SETs."""
    import asyncio
    from urllib.parse import urlsplit

    import redis.asyncio as redis

    vectors = np.eye(4, 8, dtype=np.float32)
    cache = RedisCache(url=services.redis_url, prefix=f"test:{unique('script')}:", ttl_seconds=600)
    await cache.set_many([(f"h{i}", vectors[i]) for i in range(2)])
    got = await cache.get_many(["h0", "h1", "h2"], 8)
    assert np.array_equal(got[0], vectors[0]) and np.array_equal(got[1], vectors[1]) and got[2] is None
    admin = redis.Redis.from_url(services.redis_url)
    assert 0 < await admin.ttl(cache._prefix + "h0") <= 600
    await cache.close()

    user = unique("noscript")
    await admin.execute_command("ACL", "SETUSER", user, "on", "nopass", "~*", "+@all", "-@scripting")
    try:
        url = urlsplit(services.redis_url)
        limited = RedisCache(url=f"redis://{user}:x@{url.hostname}:{url.port}{url.path}", prefix=f"test:{unique('pipe')}:", ttl_seconds=600)
        await asyncio.gather(*(limited.set_many([(f"h{i}", vectors[i])]) for i in range(2)))  # concurrent batches
        await limited.set_many([("h2", vectors[2])])
        got = await limited.get_many(["h0", "h1", "h2"], 8)
        assert all(np.array_equal(got[i], vectors[i]) for i in range(3))
        assert 0 < await admin.ttl(limited._prefix + "h2") <= 600
        refusals = [r for r in caplog.records if "refused the cache's write script" in r.getMessage()]
        assert len(refusals) == 1
        await limited.close()
    finally:
        await admin.execute_command("ACL", "DELUSER", user)
        await admin.aclose()


async def test_a_model_outage_dead_letters_nothing_and_a_poison_text_still_is(embedder, sink):
    import time

    poisoned = PoisonEmbedder(embedder)
    pipeline = Pipeline(embedder=poisoned, sink=sink, embed_retry_seconds=1.0)
    await pipeline.start()
    poisoned.down_until = time.monotonic() + 3.0  # longer than the retry time: the batch is split too
    started = time.monotonic()
    outcomes = await pipeline.process([InputEvent(f"ok-{i}", f"valid text {i}") for i in range(6)] + [InputEvent("bad", "POISON text")])
    took = time.monotonic() - started
    assert [o.error_kind for o in outcomes[:6]] == [None] * 6
    assert outcomes[6].error_kind == "embed_failed"
    assert took >= 3.0  # it waited for the model instead of dead-lettering
    print(f"\nmodel outage of 3 s: 0 of 6 valid texts dead-lettered, the poison text dead-lettered, batch took {took:.1f}s")


async def test_out_of_memory_splits_the_batch_without_dead_letters(embedder, sink):
    class OutOfMemoryError(RuntimeError):
        pass

    class SmallMemory(PoisonEmbedder):
        def embed(self, texts, token_counts=None):
            if len(texts) > 2:
                raise OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return super().embed(texts, token_counts)

    pipeline = Pipeline(embedder=SmallMemory(embedder), sink=sink, embed_retry_seconds=30.0)
    await pipeline.start()
    outcomes = await pipeline.process([InputEvent(f"m-{i}", f"memory text {i}") for i in range(8)])
    assert all(o.error_kind is None for o in outcomes)


def test_a_model_named_by_hub_id_is_keyed_by_its_resolved_files(tmp_path):
    """New weights under the same hub name must get a new cache key (model_version)."""
    import shutil
    import subprocess
    import sys

    from processors.embedder import model_version, resolve_model_path

    snapshot = tmp_path / "hub" / "models--acme--minilm" / "snapshots" / "rev1"
    shutil.copytree(resolve_model_path("all-MiniLM-L6-v2"), snapshot)
    (tmp_path / "hub" / "models--acme--minilm" / "refs").mkdir()
    (tmp_path / "hub" / "models--acme--minilm" / "refs" / "main").write_text("rev1")
    probe = "from processors.embedder import SentenceTransformerEmbedder as E; print(E(model='acme/minilm', device='cpu').version)"
    env = {**__import__("os").environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}

    def version() -> str:
        done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=180, cwd=str(Path(__file__).parents[2]))
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout.strip().splitlines()[-1]

    first = version()
    assert first == model_version(str(snapshot)) and first.startswith("sha256:")
    (snapshot / "config_sentence_transformers.json").write_text((snapshot / "config_sentence_transformers.json").read_text() + "\n")
    assert version() != first


async def test_the_normalized_text_is_what_gets_embedded(sink):
    from doubles import WordEmbedder

    embedder = WordEmbedder()
    pipeline = Pipeline(embedder=embedder, sink=QdrantSink(collection=unique("n")))
    await pipeline.start()
    await pipeline.process([InputEvent("a", "  cafe\u0301 au lait \n")])
    assert embedder.calls == [["caf\u00e9 au lait"]]  # NFC and stripped: the text the cache key names
