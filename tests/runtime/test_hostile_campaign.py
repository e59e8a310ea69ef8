"""A hostile-input campaign against the real `Worker`: property-based, on both embedded engines.

Each example is one stream mixing what a producer, a shared Redis or a store can do: ids with
`#` and control characters, oversized and malformed headers, tombstones with odd keys, NaN and
garbage in the cache, a delete and an update of one id in one batch, near-limit sizes, deep
metadata, texts the store refuses and texts the model turns into NaN. The broker is the
in-memory one (records sized like Kafka's are refused above 1 MB), the cache a real
redis-server, the stores qdrant-client's in-memory engine and qdrant-edge.

Invariants after each run: the worker is alive and stops cleanly; every offset is finished (a
result or a dead letter) and committed; each id holds exactly its last applicable event; no
stored vector is non-finite; no log line, formatted as the CLI does, carries a control character.
"""

from __future__ import annotations

import asyncio
import logging
import unicodedata
import uuid
from typing import Any

import numpy as np
import orjson
import pytest
from streams.backends import TopicPartition
from hypothesis import HealthCheck, Phase, given, settings, strategies as st

from doubles import DIM
from support import memory_settings, until, worker_on
from processors.cache import RedisCache
from schemas import content_hash
from streams.backends.memory import MemoryBroker
from streams.terminal import PrintableFormatter
from doubles import HostileEmbedder
from support import make_store as make

pytestmark = pytest.mark.parametrize("kind", ["qdrant-memory", "edge"])

IDS = ["a", "a#1", "a#2", "b", "b\x1b]0;pwned\x07", "c\u202ed", "d" * 250]
TEXT_WORDS = ["alpha", "beta", "gamma", "delta", "\x1b[2J", "é", "日本"]
HUGE = b"0" * 1_100_000


@st.composite
def hostile_event(draw: Any) -> dict[str, Any]:
    kind = draw(st.sampled_from(["upsert", "upsert", "upsert", "delete", "tombstone", "tombstone_odd_key", "garbage",
                                 "deep_metadata", "store_refuses", "model_nan", "near_limit"]))
    doc_id = draw(st.sampled_from(IDS))
    words = draw(st.lists(st.sampled_from(TEXT_WORDS), min_size=1, max_size=30))  # > 8 words: chunked
    headers = draw(st.sampled_from([
        (), (("traceparent", HUGE),), (("traceparent", b"00-zz-not-a-trace"),), (("x-tenant", b"t" * 300_000),),
        (("x-tenant", b"ok"), ("tracestate", b"k=" + b"v" * 2000)),
    ]))
    return {"kind": kind, "id": doc_id, "text": " ".join(words), "headers": headers}


def encode(event: dict[str, Any], serial: int) -> tuple[bytes | None, bytes | None]:
    """(key, value) of the record; keys are ids, as per-id order needs."""
    kind, doc_id, text = event["kind"], event["id"], event["text"]
    key = doc_id.encode()
    if kind == "delete":
        return key, orjson.dumps({"id": doc_id, "op": "delete"})
    if kind == "tombstone":
        return key, None
    if kind == "tombstone_odd_key":
        return b"\xff\xfe not utf-8", None
    if kind == "garbage":
        return key, b"\x00{not json"
    if kind == "deep_metadata":
        return key, b'{"id": "x", "text": "t", "metadata": ' + b'{"a": ' * 40 + b"1" + b"}" * 40 + b"}"
    if kind == "store_refuses":  # an id of its own: a refused last write leaves the batch's earlier ones unwritten
        return f"refused-{serial}".encode(), orjson.dumps({"id": f"refused-{serial}", "text": f"WRONGDIM {text}"})
    if kind == "model_nan":
        return key, orjson.dumps({"id": doc_id, "text": f"OVERFLOW {text}"})
    if kind == "near_limit":
        return key, orjson.dumps({"id": doc_id, "text": "x" * 99_990, "metadata": {"k": "v" * 16_000}})  # one long word
    return key, orjson.dumps({"id": doc_id, "text": text, "metadata": {"serial": serial}})


def expected_state(events: list[dict[str, Any]]) -> dict[str, int]:
    """Each id's last applicable upsert (by serial), deletes removing it; dead letters change nothing."""
    state: dict[str, int] = {}
    for serial, event in enumerate(events):
        kind, doc_id = event["kind"], event["id"]
        if kind in ("delete", "tombstone"):
            state.pop(doc_id, None)
        elif kind == "upsert":
            state[doc_id] = serial
        elif kind == "near_limit":
            state[doc_id] = -1  # no serial in its metadata
    return state


def has_control(text: str) -> bool:
    return any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") for c in text)


async def run_campaign(kind: str, tmp_path: Any, redis_url: str, events: list[dict[str, Any]], poison: list[str]) -> None:
    broker = MemoryBroker()
    broker.refuse_larger_than = 1_048_576  # Kafka's default max record size
    conf = memory_settings(  # the dead-letter breaker is off: dead letters are most of this stream
        broker, partitions=2, pass_headers="x-tenant", max_message_bytes=200_000, dlq_max_ratio=0, dlq_max_consecutive=0,
    )
    sink = make(kind, tmp_path / uuid.uuid4().hex, conf.collection)
    cache = RedisCache(url=redis_url, prefix=f"campaign:{uuid.uuid4().hex}:")
    embedder = HostileEmbedder(max_tokens=10)
    # A shared Redis someone wrote into: values of the right size, NaN or of the wrong norm.
    await cache.set_many([(content_hash(embedder.name, text), np.full(DIM, value, dtype=np.float32))
                          for text, value in zip(poison, [np.nan, 7.0, np.inf] * len(poison))])
    try:
        async with worker_on(broker, conf, sink=sink, cache=cache, embedder=embedder) as worker:
            for serial, event in enumerate(events):
                key, value = encode(event, serial)
                broker.append(conf.input_topic, value, key=key, headers=event["headers"])
            ends = {p: broker.end(TopicPartition(conf.input_topic, p)) for p in range(2)}
            await until(
                lambda: all((broker.committed(conf.group_id, TopicPartition(conf.input_topic, p)) or 0) == ends[p] for p in ends),
                "every offset committed", timeout=60,
            )
            assert worker.unfinished() == 0
        outputs = len(broker.records(conf.output_topic)) + len(broker.records(conf.dlq_topic))
        assert outputs == len(events)  # every input has its result or its dead letter
        stored: dict[str, tuple[int, int]] = {}
        for point in await sink.points():
            assert point.vector is not None and np.isfinite(point.vector).all()
            payload = point.payload
            if payload["chunk_index"] == 0:
                stored[payload["id"]] = (payload.get("metadata", {}).get("serial", -1), payload["chunk_count"])
            else:
                assert 0 < payload["chunk_index"] < payload["chunk_count"]
        expected = expected_state(events)
        assert {k: v[0] for k, v in stored.items()} == expected
        chunks = {}
        for point in await sink.points(with_vectors=False):
            chunks.setdefault(point.payload["id"], set()).add(point.payload["chunk_index"])
        assert all(indices == set(range(stored[doc][1])) for doc, indices in chunks.items())
    finally:
        await cache.close()
        await sink.close()


# No shrinking: a failing stream is printed whole, and shrinking one costs minutes of worker runs.
@settings(max_examples=12, deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate],
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(
    events=st.lists(hostile_event(), min_size=1, max_size=40),
    poison=st.lists(st.sampled_from(["alpha", "beta gamma", "delta"]), max_size=3, unique=True),
)
def test_the_worker_keeps_its_promises_under_hostile_input(kind, tmp_path, services, caplog, events, poison):
    caplog.clear()
    with caplog.at_level(logging.INFO):
        asyncio.run(run_campaign(kind, tmp_path, services.redis_url, events, poison))
    formatter = PrintableFormatter("%(levelname)s %(name)s %(message)s")
    for record in caplog.records:
        assert not has_control(formatter.format(record).replace("\n", "")), record.getMessage()[:200]
