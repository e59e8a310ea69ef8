"""The runtime's Kafka-side logic on the in-memory backend: commits, fencing, backpressure, lag.

The real `Worker` and `Pipeline` and the real (in-memory) Qdrant engine; the broker is
`streams.backends.memory.MemoryBroker` and the model a word-per-token stand-in, so each
test runs in well under a second. The same behaviour is tested on the real broker in
test_runtime.py, test_mirror.py and test_faults.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import orjson
import pytest

from streams.backends import TopicPartition
from doubles import GatedCache, WordEmbedder
from processors.backoff import Backoff
from doubles import FailingSink
from processors.sink import QdrantSink
from schemas import content_hash
from streams.assembly import build_worker
from streams.backends.memory import MemoryBroker
from streams.metrics import Metrics
from streams.offsets import OffsetTracker
from streams.runtime import PublishError, Worker, WorkerObserver
from support import memory_settings, until, worker_on


def body(doc_id: str, text: str, **metadata: Any) -> bytes:
    return orjson.dumps({"id": doc_id, "text": text, "metadata": metadata})


def input_tp(settings: Any, partition: int = 0) -> TopicPartition:
    return TopicPartition(settings.input_topic, partition)


async def test_results_and_commits_follow_offsets_when_a_later_batch_is_ready_first():
    broker = MemoryBroker()
    settings = memory_settings(broker, max_in_flight_batches=3)
    cache = GatedCache()
    gate = cache.get_gates[content_hash("words", "text 0")] = asyncio.Event()
    async with worker_on(broker, settings, cache=cache) as worker:
        for i in range(24):
            broker.append(settings.input_topic, body(f"id-{i}", f"text {i}"), partition=0)
        await until(lambda: worker.in_flight_batches == 3, "three batches in flight")
        # The two later batches have looked up and embedded their texts: they wait for their turn.
        later = sum(list(worker.stats.batch_sizes)[1:3])
        await until(lambda: (worker.metrics.registry.get_sample_value("embedworker_cache_misses_total") or 0) >= later,
                    "the later batches to be ready to write")
        assert broker.records(settings.output_topic) == []  # no result overtakes the gated first batch
        assert (broker.committed(settings.group_id, input_tp(settings)) or 0) == 0
        gate.set()
        await until(lambda: broker.committed(settings.group_id, input_tp(settings)) == 24, "everything committed")
    ids = [orjson.loads(r.value)["id"] for r in broker.records(settings.output_topic)]
    assert ids == [f"id-{i}" for i in range(24)]


async def test_a_rebalance_fences_the_revoked_batches_of_a_stalled_member():
    broker = MemoryBroker()
    settings = memory_settings(broker, partitions=2, max_in_flight_batches=2)
    shared = QdrantSink(collection=settings.collection)
    stalled = FailingSink(shared)
    stalled.failing = True
    published: list[tuple[float, int]] = []
    revoked_at: dict[int, float] = {}
    observer = WorkerObserver(
        on_published=lambda items: published.extend((time.monotonic(), tp.partition) for tp, _ in items),
        on_revoked=lambda tps: revoked_at.update({tp.partition: time.monotonic() for tp in tps}),
    )
    docs = [f"doc-{i}" for i in range(12)]
    async with worker_on(broker, settings, sink=stalled, observer=observer) as a:
        a.pipeline.sink_backoff = Backoff(base_seconds=0.01, cap_seconds=0.05)
        for d in docs:
            broker.append(settings.input_topic, body(d, f"old {d}", v=1), key=d.encode())
        await until(lambda: stalled.failed_calls >= 2, "A's writes to fail")
        async with worker_on(broker, settings, sink=shared) as b:
            await until(lambda: b.assigned() and a.assigned(), "the partitions to be shared")
            moved = {tp.partition for tp in b.assigned()}
            for d in docs:
                broker.append(settings.input_topic, body(d, f"new {d}", v=2), key=d.encode())
            await until(lambda: all(broker.committed(settings.group_id, TopicPartition(settings.input_topic, p)) == broker.end(
                TopicPartition(settings.input_topic, p)) for p in moved), "B to commit its partitions")
            stalled.failing = False
            await until(lambda: a.in_flight_batches == 0 and all(
                broker.committed(settings.group_id, tp) == broker.end(tp) for tp in a.assigned()), "A to finish its own")
    late = [p for t, p in published if p in moved and t > revoked_at[p]]
    assert late == []
    points = {p.payload["id"]: p.payload["metadata"] for p in await shared.points(with_vectors=False)}
    assert points == {d: {"v": 2} for d in docs}


async def test_a_sink_outage_pauses_commits_nothing_and_lag_keeps_rising_while_paused():
    broker = MemoryBroker()
    metrics = Metrics()
    settings = memory_settings(broker, buffer_max_messages=20)
    sink = FailingSink(QdrantSink(collection=settings.collection))
    sink.failing = True
    async with worker_on(broker, settings, sink=sink, metrics=metrics) as worker:
        worker.pipeline.sink_backoff = Backoff(base_seconds=0.01, cap_seconds=0.02)
        for i in range(40):
            broker.append(settings.input_topic, body(f"id-{i}", f"text {i}"))
        await until(lambda: metrics.registry.get_sample_value("embedworker_backpressure_paused") == 1, "a pause")

        def lag() -> float:
            return metrics.registry.get_sample_value(
                "embedworker_consumer_lag_records", {"topic": settings.input_topic, "partition": "0"}) or 0.0

        await until(lambda: lag() == 40, "the lag of the first 40")
        for i in range(200):
            broker.append(settings.input_topic, body(f"more-{i}", f"more {i}"))
        await until(lambda: lag() == 240, "the lag to rise by the 200 produced while paused")
        assert broker.committed(settings.group_id, input_tp(settings)) in (None, 0)
        sink.failing = False
        await until(lambda: broker.committed(settings.group_id, input_tp(settings)) == 240, "recovery", timeout=20)


async def test_lag_reaches_zero_behind_transaction_markers():
    broker = MemoryBroker()
    settings = memory_settings(broker)
    async with worker_on(broker, settings) as worker:
        for i in range(10):
            broker.append(settings.input_topic, body(f"id-{i}", f"text {i}"), partition=0)
            broker.append(settings.input_topic, None, partition=0, control=True)  # a commit marker
        await until(lambda: broker.committed(settings.group_id, input_tp(settings)) == 20, "the commit to pass the markers")
        await until(lambda: worker.lag_records().get(input_tp(settings)) == 0, "lag 0")


def test_an_idle_partition_commits_the_position_but_never_past_unfinished_work():
    tracker, tp = OffsetTracker(), "p0"
    tracker.set_committed(tp, 0)
    tracker.register(tp, 0)
    assert not tracker.advance_idle(tp, 2)  # offset 0 is unfinished
    tracker.finish(tp, 0)
    assert tracker.to_commit([tp]) == {tp: 1}
    assert tracker.advance_idle(tp, 2) and tracker.to_commit([tp]) == {tp: 2}  # past the marker at 1
    assert not tracker.advance_idle(tp, 1)  # never backwards


async def test_an_oversized_dead_letter_is_capped_and_the_partition_moves_on():
    broker = MemoryBroker()
    broker.refuse_larger_than = 1_048_588  # Kafka's default message.max.bytes
    settings = memory_settings(broker)
    async with worker_on(broker, settings):
        broker.append(settings.input_topic, b"\x01" * 900_000, partition=0)
        for i in range(50):
            broker.append(settings.input_topic, body(f"id-{i}", f"text {i}"), partition=0)
        await until(lambda: broker.committed(settings.group_id, input_tp(settings)) == 51, "the partition to move on")
    (letter,) = [orjson.loads(r.value) for r in broker.records(settings.dlq_topic)]
    assert letter["payload_truncated"] is True and letter["payload_size"] == 900_000
    assert len(broker.records(settings.output_topic)) == 50


async def test_a_dead_letter_the_broker_refuses_goes_without_its_payload_and_a_result_it_refuses_stops(caplog):
    broker = MemoryBroker()
    broker.refuse_larger_than = 400  # bigger than a bare dead letter, smaller than a capped one
    settings = memory_settings(broker, dlq_max_payload_bytes=10_000)
    metrics = Metrics()
    async with worker_on(broker, settings, metrics=metrics):
        broker.append(settings.input_topic, b"x" * 5000, partition=0)
        await until(lambda: broker.committed(settings.group_id, input_tp(settings)) == 1, "the bare dead letter")
    (letter,) = [orjson.loads(r.value) for r in broker.records(settings.dlq_topic)]
    assert letter["payload"] is None and letter["payload_truncated"] is True
    assert metrics.registry.get_sample_value(
        "embedworker_publish_errors_total", {"kind": "dead_letter", "error": "MessageSizeTooLargeError"}) == 1

    broker.refuse_larger_than = 10  # now even a result is refused: one clear error, the worker stops
    settings = memory_settings(broker)
    worker = build_worker(settings, embedder=WordEmbedder(), sink=QdrantSink(collection=settings.collection), backend=broker)
    broker.append(settings.input_topic, body("a", "text"), partition=0)
    with caplog.at_level(logging.ERROR), pytest.raises(PublishError, match="cannot be retried"):
        await asyncio.wait_for(worker.run(), timeout=10)
    assert (broker.committed(settings.group_id, input_tp(settings)) or 0) == 0


async def test_a_publish_outage_is_retried_and_nothing_is_committed_meanwhile():
    broker = MemoryBroker()
    settings = memory_settings(broker)
    broker.fail_sends = True
    async with worker_on(broker, settings) as worker:
        worker.publisher.backoff = Backoff(base_seconds=0.01, cap_seconds=0.02)
        for i in range(10):
            broker.append(settings.input_topic, body(f"id-{i}", f"text {i}"), partition=0)
        await until(lambda: (worker.metrics.registry.get_sample_value(
            "embedworker_publish_errors_total", {"kind": "result", "error": "KafkaConnectionError"}) or 0) >= 3, "retries")
        assert (broker.committed(settings.group_id, input_tp(settings)) or 0) == 0
        broker.fail_sends = False
        await until(lambda: broker.committed(settings.group_id, input_tp(settings)) == 10, "recovery")


async def test_brief_pauses_are_counted_but_not_logged_at_info(caplog):
    broker = MemoryBroker()
    settings = memory_settings(broker, max_in_flight_batches=1, buffer_max_messages=16, fetch_max_records=64)
    with caplog.at_level(logging.INFO, logger="streams.runtime"):
        async with worker_on(broker, settings) as worker:
            for i in range(1500):
                broker.append(settings.input_topic, body(f"id-{i}", f"text {i % 50}"), partition=0)
            await until(lambda: broker.committed(settings.group_id, input_tp(settings)) == 1500, "the backlog", timeout=60)
    infos = [r for r in caplog.records if r.levelno >= logging.INFO and ("paus" in r.getMessage() or "resum" in r.getMessage())]
    assert worker.stats.pauses >= 5, "the backlog should pause the consumer again and again"
    assert len(infos) <= 2, [r.getMessage() for r in infos]


async def test_results_still_retrying_when_their_partition_is_revoked_are_never_published():
    broker = MemoryBroker()
    settings = memory_settings(broker, partitions=2)
    revoked_at: dict[int, float] = {}
    observer = WorkerObserver(on_revoked=lambda tps: revoked_at.update({tp.partition: time.monotonic() for tp in tps}))
    docs = [f"doc-{i}" for i in range(12)]
    async with worker_on(broker, settings, observer=observer) as a:
        a.publisher.backoff = Backoff(base_seconds=0.01, cap_seconds=0.05)
        a._producer.fail_sends = True  # A's results keep failing (retriable): its batches hold on, retrying
        for d in docs:  # all on partition 1, which a second member takes (round robin: A keeps 0)
            broker.append(settings.input_topic, body(d, f"text of {d}"), key=d.encode(), partition=1)
        await until(lambda: (a.metrics.registry.get_sample_value(
            "embedworker_publish_errors_total", {"kind": "result", "error": "KafkaConnectionError"}) or 0) >= 2, "A to retry")
        async with worker_on(broker, settings) as b:
            await until(lambda: b.assigned() and a.assigned(), "the partitions to be shared")
            assert {tp.partition for tp in b.assigned()} == {1}
            await until(lambda: broker.committed(settings.group_id, input_tp(settings, 1)) == len(docs), "B to redo partition 1")
            a._producer.fail_sends = False  # A's stuck retries may now succeed: they must not be sent at all
            await until(lambda: a.in_flight_batches == 0, "A's stuck batches to end")
        sent_by_a = [r for t, r in a._producer.records if r.topic == settings.output_topic and t > revoked_at[1]]
    assert sent_by_a == [], f"A published {len(sent_by_a)} results of a partition it had lost"
    assert {orjson.loads(r.value)["id"] for r in broker.records(settings.output_topic)} == set(docs)


async def test_a_retry_sends_again_what_came_after_a_failed_record_of_the_same_key():
    """Unit test of the logic (no I/O): batch 1 of a partition fails, batch 2 (a newer result of the same key) lands."""
    from streams.steps.publish import OutRecord, Publisher

    log: list[bytes] = []
    calls = {"n": 0}

    async def send_many(topic, records):
        calls["n"] += 1
        loop = asyncio.get_running_loop()
        out = []
        for index, (key, value, _) in enumerate(records):
            ack = loop.create_future()
            if calls["n"] == 1 and index == 0:
                from streams.backends import BrokerUnavailable

                ack.set_exception(BrokerUnavailable("batch expired", kind="KafkaTimeoutError"))
            else:
                log.append(value)
                ack.set_result(None)
            out.append(([index], ack))
        return out

    async def send(topic, key, value, headers=()):
        raise AssertionError("send_many covers these")

    publisher = Publisher(send=send, send_many=send_many, backoff=Backoff(base_seconds=0.001, cap_seconds=0.001))
    await publisher.publish([OutRecord("out", b"x", b"x@3"), OutRecord("out", b"x", b"x@7"), OutRecord("out", b"y", b"y@1")])
    assert log[-1] == b"x@7" and log.index(b"x@3") < len(log) - 1  # x's last result is still its last event


async def test_trace_context_and_named_headers_travel_to_results_and_dead_letters():
    broker = MemoryBroker()
    settings = memory_settings(broker, pass_headers="x-tenant")
    trace = ("traceparent", b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    headers = (trace, ("x-tenant", b"acme"), ("x-secret", b"not-copied"))
    async with worker_on(broker, settings):
        broker.append(settings.input_topic, body("a", "some text"), partition=0, headers=headers)
        broker.append(settings.input_topic, b"{not json", partition=0, headers=headers)
        await until(lambda: broker.committed(settings.group_id, input_tp(settings)) == 2, "both messages")
    (result,) = broker.records(settings.output_topic)
    (letter,) = broker.records(settings.dlq_topic)
    assert dict(result.headers) == {"traceparent": trace[1], "x-tenant": b"acme"}
    assert dict(letter.headers) == {"traceparent": trace[1], "x-tenant": b"acme"}
