"""Hostile input at the decode step: bounded work on the event loop, one rule for nulls, keys that are not ids.

The decode tests are pure (no I/O); the key test runs the real `Worker` on the in-memory broker.
"""

from __future__ import annotations

import orjson
import pytest
from streams.backends import TopicPartition

from support import memory_settings, until, worker_on
from schemas import OP_UPSERT, InvalidEvent, Limits, decode_input
from streams.backends.memory import MemoryBroker


def padded(arrays: int) -> bytes:
    """A valid event with `arrays` tiny nested arrays in a field the worker ignores."""
    return orjson.dumps({"id": "x", "text": "hello", "ignored": [[[1], [2]] for _ in range(arrays // 3)]})


def test_a_message_of_too_many_arrays_is_refused_before_it_is_parsed():
    with pytest.raises(InvalidEvent) as caught:
        decode_input(padded(240_000))  # ~0.8 MB: 0.33 s of the loop on a73af8e, 0.6 ms now
    assert caught.value.kind == "too_complex"
    assert "limit is 50000" in caught.value.message


def test_ignored_fields_are_never_walked_and_metadata_depth_still_counts():
    event = decode_input(padded(45_000))  # under the cap: parsed, its ignored field not walked
    assert (event.id, event.text) == ("x", "hello")
    deep = {"id": "x", "text": "t", "ignored": {"a": {"b": {"c": {"d": 1}}}}, "metadata": {"k": 1}}
    assert decode_input(orjson.dumps(deep), Limits(max_depth=3)).metadata == {"k": 1}
    with pytest.raises(InvalidEvent) as caught:
        decode_input(orjson.dumps({"id": "x", "text": "t", "metadata": {"a": {"b": {"c": 1}}}}), Limits(max_depth=3))
    assert caught.value.kind == "too_deep"


def test_null_means_absent_for_every_optional_field():
    event = decode_input(b'{"id": "x", "text": "t", "op": null, "metadata": null}')
    assert (event.op, event.metadata) == (OP_UPSERT, {})


async def test_a_keyed_upsert_whose_key_is_not_its_id_is_counted_and_logged_once_per_partition(caplog):
    broker = MemoryBroker()
    settings = memory_settings(broker, partitions=1)
    async with worker_on(broker, settings) as worker:
        for i in range(3):
            broker.append(settings.input_topic, orjson.dumps({"id": f"doc-{i}", "text": f"t {i}"}), partition=0, key=b"other")
        broker.append(settings.input_topic, orjson.dumps({"id": "doc-9", "text": "t"}), partition=0, key=b"doc-9")
        broker.append(settings.input_topic, orjson.dumps({"id": "doc-8", "text": "t"}), partition=0)  # keyless
        tp = TopicPartition(settings.input_topic, 0)
        await until(lambda: broker.committed(settings.group_id, tp) == 5, "all committed")
        assert worker.metrics.registry.get_sample_value("embedworker_key_id_mismatches_total") == 3
    assert sum("key is not its event's id" in r.getMessage() for r in caplog.records) == 1
