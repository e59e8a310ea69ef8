"""End to end on a real broker, a real Redis, a real Qdrant engine and the real model."""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from schemas import point_id
from support import TEXTS, committed_offsets, event, make_cache, make_settings, make_sink, produce, read_topic, running_worker, until
from support import retrieve

pytestmark = pytest.mark.integration



async def test_valid_duplicate_and_malformed_events(services, embedder):
    settings = await make_settings(services, partitions=2)
    valid = [event(f"id-{i}", TEXTS[i % len(TEXTS)], n=i) for i in range(40)]  # 35 duplicates of content
    malformed = [b"not json", b"[1, 2]", b'{"id": "x"}', b'{"id": "", "text": "t"}', b'{"id": "y", "text": 3}', b"\xff\xfe"]
    await produce(settings, valid + malformed, keys=[f"k{i}".encode() for i in range(len(valid) + len(malformed))])

    sink = make_sink(settings)
    async with running_worker(settings, embedder, sink=sink) as worker:
        await until(lambda: worker.stats.processed + worker.stats.dead_letters == 46, timeout=120, what="all events handled")
        await until(lambda: sum(worker.lag_records().values()) == 0 and len(worker.lag_records()) == 2, timeout=30, what="commits")

    results = await read_topic(settings, settings.output_topic, expect=40)
    dead = await read_topic(settings, settings.dlq_topic, expect=6)
    assert len(results) == 40 and len(dead) == 6

    by_id = {orjson.loads(r.value)["id"]: orjson.loads(r.value) for r in results}
    assert sorted(by_id) == sorted(f"id-{i}" for i in range(40))
    for record in results:
        body = orjson.loads(record.value)
        assert record.key == body["id"].encode()
        assert body["status"] == "ok" and body["dim"] == 384 and body["collection"] == settings.collection
        assert body["point_id"] == point_id(body["id"])
    # Every text appears 8 times: at most one embedding per distinct text, the rest are hits.
    assert sum(not b["cached"] for b in by_id.values()) == len(TEXTS)

    kinds = sorted(orjson.loads(r.value)["error"]["type"] for r in dead)
    assert kinds == sorted(["invalid_json", "not_an_object", "missing_text", "empty_id", "invalid_text", "invalid_utf8"])
    for record in dead:
        body = orjson.loads(record.value)
        assert body["source"]["topic"] == settings.input_topic
        assert set(body) >= {"error", "source", "payload"}

    assert await sink.count() == 40
    points = await retrieve(sink, [point_id(f"id-{i}") for i in range(40)])
    expected = embedder.embed(TEXTS).vectors
    for i in range(40):
        vector, payload = points[point_id(f"id-{i}")]
        assert payload["id"] == f"id-{i}" and payload["metadata"] == {"n": i}
        assert float(np.dot(vector, expected[i % len(TEXTS)])) > 0.999

    committed = await committed_offsets(settings, 2)
    assert sum(committed.values()) == 46


async def test_cache_hits_across_restarts_and_replay_overwrites(services, embedder):
    settings = await make_settings(services, partitions=1)
    sink = make_sink(settings)
    cache = make_cache(settings)
    await produce(settings, [event("a", TEXTS[0]), event("b", TEXTS[1])])
    async with running_worker(settings, embedder, sink=sink, cache=cache) as worker:
        await until(lambda: worker.stats.processed == 2, timeout=60, what="first pass")
    # Same texts under new ids, and id "a" again with new text: last write wins.
    await produce(settings, [event("c", TEXTS[0]), event("a", TEXTS[2])])
    async with running_worker(settings, embedder, sink=sink, cache=make_cache(settings)) as worker:
        await until(lambda: worker.stats.processed == 2, timeout=60, what="second pass")
        assert worker.stats.cached == 1  # "c" from Redis; "a"'s new text is new
    assert await sink.count() == 3
    points = await retrieve(sink, [point_id("a")])
    assert points[point_id("a")][1]["text"] == TEXTS[2]


async def test_trace_context_and_named_headers_reach_the_result_on_a_real_broker(services, embedder):
    from streams.backends.kafka import make_producer

    settings = await make_settings(services, partitions=1, pass_headers="x-tenant")
    trace = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    producer = make_producer(settings)
    await producer.start()
    try:
        for i in range(3):
            await producer.send_and_wait(settings.input_topic, event(f"h{i}", f"a text with headers {i}"), key=f"h{i}".encode(),
                                         headers=[("traceparent", trace), ("x-tenant", b"acme"), ("x-other", b"no")])
    finally:
        await producer.stop()
    async with running_worker(settings, embedder) as worker:
        await until(lambda: worker.stats.processed == 3, timeout=60, what="the events")
    results = await read_topic(settings, settings.output_topic, expect=3)
    assert all(dict(r.headers) == {"traceparent": trace, "x-tenant": b"acme"} for r in results)
