"""Headers from the wire: validated and capped before they are copied, counted while held,
and never the reason a result cannot be published (the hardening issue's findings 4 and 5)."""

from __future__ import annotations

import asyncio

import orjson
from streams.backends import TopicPartition

from doubles import GatedCache
from support import memory_settings, until, worker_on
from schemas import content_hash, copied_headers
from schemas.headers import MAX_COPIED_HEADER_BYTES, MAX_NAMED_HEADER_BYTES
from streams.backends.memory import MemoryBroker

TRACEPARENT = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
NAMES = frozenset({"traceparent", "tracestate", "x-tenant", "x-other", "embedworker-replay-count"})


def test_only_well_formed_headers_within_their_caps_are_copied():
    kept, dropped = copied_headers(
        [("traceparent", TRACEPARENT), ("tracestate", b"k=v"), ("x-tenant", b"t1"), ("x-unnamed", b"secret")], NAMES
    )
    assert kept == (("traceparent", TRACEPARENT), ("tracestate", b"k=v"), ("x-tenant", b"t1")) and dropped == 0
    bad = [
        ("traceparent", TRACEPARENT + b"0" * 1_000_000),
        ("traceparent", b"00-zz-not-a-trace"),
        ("traceparent", b"ff" + TRACEPARENT[2:]),  # version ff is invalid
        ("traceparent", b"00-" + b"0" * 32 + TRACEPARENT[35:]),  # all-zero trace id
        ("tracestate", b"k=" + b"v" * 600),
        ("tracestate", b"k=\x1b[2J"),
        ("x-tenant", b"t" * (MAX_NAMED_HEADER_BYTES + 1)),
        ("x-tenant", None),
    ]
    for header in bad:
        assert copied_headers([header], NAMES) == ((), 1), header
    assert copied_headers([("embedworker-replay-count", b"12")], NAMES, replay_header="embedworker-replay-count")[0]
    assert copied_headers([("embedworker-replay-count", b"1e9")], NAMES, replay_header="embedworker-replay-count")[1] == 1


def test_the_first_of_a_repeated_header_counts_and_the_total_is_capped():
    kept, _ = copied_headers([("x-tenant", b"first"), ("x-tenant", b"second")], NAMES)
    assert kept == (("x-tenant", b"first"),)
    many = frozenset(f"h{i}" for i in range(10))
    kept, dropped = copied_headers([(f"h{i}", b"v" * 4000) for i in range(10)], many)
    assert sum(len(n) + len(v) for n, v in kept) <= MAX_COPIED_HEADER_BYTES and dropped == 10 - len(kept) > 0


async def test_a_megabyte_header_never_stops_the_worker_and_its_result_goes_out():
    broker = MemoryBroker()
    broker.refuse_larger_than = 1_048_576  # Kafka's default record limit
    settings = memory_settings(broker, pass_headers="x-tenant")
    tp = TopicPartition(settings.input_topic, 0)
    async with worker_on(broker, settings) as worker:
        broker.append(settings.input_topic, orjson.dumps({"id": "a", "text": "one"}), key=b"a",
                      headers=(("traceparent", b"0" * 1_100_000),))
        broker.append(settings.input_topic, orjson.dumps({"id": "b", "text": "two"}), key=b"b",
                      headers=(("x-tenant", b"t" * 600_000), ("traceparent", TRACEPARENT)))
        await until(lambda: broker.committed(settings.group_id, tp) == 2, "both committed")
        assert worker.metrics.registry.get_sample_value("embedworker_headers_dropped_total") == 2
    results = broker.records(settings.output_topic)
    assert [orjson.loads(r.value)["id"] for r in results] == ["a", "b"]
    assert results[0].headers == () and results[1].headers == (("traceparent", TRACEPARENT),)


async def test_a_result_the_broker_refuses_with_its_headers_is_sent_without_them(caplog):
    broker = MemoryBroker()
    broker.refuse_larger_than = 400  # a bare result fits; with a 3 KB named header it does not
    settings = memory_settings(broker, pass_headers="x-tenant")
    tp = TopicPartition(settings.input_topic, 0)
    async with worker_on(broker, settings):
        broker.append(settings.input_topic, orjson.dumps({"id": "a", "text": "one"}), key=b"a",
                      headers=(("x-tenant", b"t" * 3000),))
        await until(lambda: broker.committed(settings.group_id, tp) == 1, "committed")
    (result,) = broker.records(settings.output_topic)
    assert result.headers == ()
    assert any("the broker refused" in r.getMessage() and "without its copied headers" in r.getMessage() for r in caplog.records)


async def test_buffered_bytes_count_the_headers_held_with_a_message():
    broker = MemoryBroker()
    settings = memory_settings(broker, pass_headers="x-tenant")
    cache = GatedCache()
    gate = cache.get_gates[content_hash("words", "held text")] = asyncio.Event()
    async with worker_on(broker, settings, cache=cache) as worker:
        value = orjson.dumps({"id": "a", "text": "held text"})
        broker.append(settings.input_topic, value, key=b"a", headers=(("x-tenant", b"t" * 4000),))
        await until(lambda: worker.unfinished() == 1, "the message held")
        assert worker.finish.buffered_bytes >= len(value) + 4000
        gate.set()
        await until(lambda: worker.unfinished() == 0, "finished")


async def test_a_dead_letter_with_a_megabyte_header_goes_out_and_is_committed():
    broker = MemoryBroker()
    broker.refuse_larger_than = 1_048_576
    settings = memory_settings(broker, pass_headers="x-tenant")
    tp = TopicPartition(settings.input_topic, 0)
    async with worker_on(broker, settings):
        broker.append(settings.input_topic, b"{not json", key=b"a",
                      headers=(("traceparent", b"f" * 1_100_000), ("x-tenant", b"t" * 1_100_000)))
        await until(lambda: broker.committed(settings.group_id, tp) == 1, "committed")
    (letter,) = broker.records(settings.dlq_topic)
    assert letter.headers == ()


async def test_a_dead_letter_refused_with_its_headers_loses_them_first_then_its_payload(caplog):
    broker = MemoryBroker()
    broker.refuse_larger_than = 1000  # a bare dead letter fits; one with its payload or a 3 KB header does not
    settings = memory_settings(broker, pass_headers="x-tenant")
    tp = TopicPartition(settings.input_topic, 0)
    async with worker_on(broker, settings):
        broker.append(settings.input_topic, b"{not json" + b" " * 2000, key=b"a", headers=(("x-tenant", b"t" * 3000),))
        await until(lambda: broker.committed(settings.group_id, tp) == 1, "committed")
    (letter,) = broker.records(settings.dlq_topic)
    assert letter.headers == () and len(letter.value) <= 1000
    messages = [r.getMessage() for r in caplog.records]
    assert any("the broker refused" in m and "without its copied headers" in m for m in messages)
    assert any("the broker refused" in m and "without its payload" in m for m in messages)


async def test_the_client_refusing_a_record_is_named_and_the_record_goes_without_its_headers(caplog):
    from streams.backends import RecordTooLarge
    from streams.steps.publish import OutRecord, Publisher

    sent: list[tuple[bytes, tuple]] = []

    async def send(topic, key, value, headers=()):
        if headers:  # as aiokafka's `send` does past `max_request_size`: raised before anything is queued
            raise RecordTooLarge("The message is larger than the maximum request size", kind="MessageSizeTooLargeError")
        sent.append((value, headers))
        future = asyncio.get_running_loop().create_future()
        future.set_result(None)
        return future

    await Publisher(send=send).publish([OutRecord("out", b"a", b"result", headers=(("x-tenant", b"t" * 100),))])
    assert sent == [(b"result", ())]
    assert any("the client refused" in r.getMessage() and "without its copied headers" in r.getMessage() for r in caplog.records)


async def test_records_are_sized_before_sending_as_send_many_skips_the_clients_check(caplog):
    from streams.steps.publish import OutRecord, Publisher

    batches: list[list[tuple]] = []

    async def send_many(topic, records):
        # aiokafka's `send_batch` path: a batch always takes its first record, whatever its size
        batches.append(list(records))
        future = asyncio.get_running_loop().create_future()
        future.set_result(None)
        return [(list(range(len(records))), future)]

    async def send(topic, key, value, headers=()):
        raise AssertionError("send_many covers these")

    publisher = Publisher(send=send, send_many=send_many, max_record_bytes=1000)
    await publisher.publish([
        OutRecord("out", b"a", b"small", headers=(("x-tenant", b"t" * 100),)),
        OutRecord("out", b"b", b"r" * 500, headers=(("x-tenant", b"t" * 3000),)),
        OutRecord("out", b"c", b"p" * 5000, fallback=b"bare", kind="dead_letter"),
    ])
    (batch,) = batches
    assert batch == [(b"a", b"small", (("x-tenant", b"t" * 100),)), (b"b", b"r" * 500, ()), (b"c", b"bare", ())]
    messages = [r.getMessage() for r in caplog.records]
    assert any("result" in m and "without its copied headers" in m for m in messages)
    assert any("dead letter" in m and "without its payload" in m for m in messages)
