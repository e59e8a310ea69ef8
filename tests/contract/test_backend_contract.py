"""One contract, two brokers: the same assertions on the in-memory broker and on the real one.

The runtime tests trust `streams.backends.memory.MemoryBroker` to behave as Kafka does where the
worker's logic depends on it (as Arroyo's `StreamsTestMixin` runs one suite on its local and its
Kafka backend). Each test here runs on both: `memory` and `kafka` (aiokafka's clients through
`KafkaBackend` against the broker the integration tests start, or KAFKA_BOOTSTRAP_SERVERS).
What differs between the two is what the worker must not depend on.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any, AsyncIterator

import orjson
import pytest

from streams.backends import BrokerError, CommitFailed, NotAssigned, RecordTooLarge, TopicPartition
from streams.backends.kafka import KafkaBackend
from streams.backends.memory import MemoryBroker
from support import event, make_settings, memory_settings, until

pytestmark = pytest.mark.integration


@dataclass
class Broker:
    """A backend and settings with topics of their own (`partitions` on the input topic)."""

    name: str
    backend: Any
    settings: Any

    def consumer(self) -> Any:
        return _started(self.backend.consumer(self.settings))

    def producer(self) -> Any:
        return _started(self.backend.producer(self.settings))


@contextlib.asynccontextmanager
async def _started(client: Any) -> AsyncIterator[Any]:
    """A consumer or producer, started, and stopped after."""
    await client.start()
    try:
        yield client
    finally:
        await client.stop()


class Listener:
    def __init__(self) -> None:
        self.assigned: set[TopicPartition] = set()

    async def on_partitions_revoked(self, revoked: Any) -> None:
        self.assigned -= set(revoked)

    async def on_partitions_assigned(self, assigned: Any) -> None:
        self.assigned |= set(assigned)


@pytest.fixture(params=["memory", "kafka"])
async def broker(request: pytest.FixtureRequest) -> Broker:
    if request.param == "memory":
        memory = MemoryBroker()
        return Broker("memory", memory, memory_settings(memory, partitions=2))
    services = request.getfixturevalue("services")
    return Broker("kafka", KafkaBackend(), await make_settings(services, partitions=2))


async def fetch(consumer: Any, count: int, *, timeout: float = 30.0) -> list[Any]:
    got: list[Any] = []

    async def enough() -> bool:
        for messages in (await consumer.getmany(timeout_ms=100)).values():
            got.extend(messages)
        return len(got) >= count

    await until(enough, what=f"{count} records", timeout=timeout)
    return got


async def test_a_partitions_records_come_back_in_offset_order_with_key_value_and_headers(broker: Broker) -> None:
    topic = broker.settings.input_topic
    async with broker.producer() as producer:
        acks = [await producer.send(topic, value=event(f"d{i}", f"text {i}"), key=b"same-key", headers=[("h", b"%d" % i)])
                for i in range(20)]
        await asyncio.gather(*acks)
    async with broker.consumer() as consumer:
        listener = Listener()
        consumer.subscribe([topic], listener=listener)
        records = await fetch(consumer, 20)
    assert {r.partition for r in records} == {records[0].partition}, "one key, one partition"
    assert [r.offset for r in records] == list(range(records[0].offset, records[0].offset + 20))
    assert [orjson.loads(r.value)["id"] for r in records] == [f"d{i}" for i in range(20)]
    assert all(r.key == b"same-key" for r in records)
    assert [dict(r.headers)["h"] for r in records] == [b"%d" % i for i in range(20)]
    assert listener.assigned == {TopicPartition(topic, 0), TopicPartition(topic, 1)}


async def test_send_many_acknowledges_every_record_in_order(broker: Broker) -> None:
    topic = broker.settings.input_topic
    async with broker.producer() as producer:
        sent = await producer.send_many(topic, [(b"k", b"v%d" % i, ()) for i in range(50)])
        await asyncio.gather(*(ack for _, ack in sent))
    assert sorted(i for indices, _ in sent for i in indices) == list(range(50))
    async with broker.consumer() as consumer:
        consumer.subscribe([topic], listener=Listener())
        records = await fetch(consumer, 50)
    assert [r.value for r in records] == [b"v%d" % i for i in range(50)]


async def test_a_committed_offset_is_where_the_groups_next_member_starts(broker: Broker) -> None:
    topic = broker.settings.input_topic
    async with broker.producer() as producer:
        await asyncio.gather(*[await producer.send(topic, value=b"%d" % i, key=b"k") for i in range(10)])
    async with broker.consumer() as consumer:
        consumer.subscribe([topic], listener=Listener())
        records = await fetch(consumer, 10)
        tp = TopicPartition(topic, records[0].partition)
        await consumer.commit({tp: records[0].offset + 6})
        assert await consumer.committed(tp) == records[0].offset + 6
    async with broker.consumer() as consumer:
        consumer.subscribe([topic], listener=Listener())
        again = await fetch(consumer, 4)
    assert [r.value for r in again] == [b"%d" % i for i in range(6, 10)]


async def test_a_paused_partition_returns_nothing_until_resumed(broker: Broker) -> None:
    topic = broker.settings.input_topic
    async with broker.consumer() as consumer:
        await subscribed(consumer, topic)
        consumer.pause(*consumer.assignment())
        async with broker.producer() as producer:
            await asyncio.gather(*[await producer.send(topic, value=b"%d" % i, key=b"k") for i in range(5)])
        for _ in range(5):
            assert not any((await consumer.getmany(timeout_ms=50)).values()), "a paused partition delivered"
        consumer.resume(*consumer.assignment())
        assert len(await fetch(consumer, 5)) == 5


async def subscribed(consumer: Any, topic: str) -> None:
    """Subscribe `consumer` to `topic` and poll until the group assigned it partitions."""
    listener = Listener()
    consumer.subscribe([topic], listener=listener)

    async def assigned() -> bool:
        await consumer.getmany(timeout_ms=50)
        return bool(listener.assigned)

    await until(assigned, what="an assignment", timeout=30)


async def test_highwater_and_position_reach_the_log_end_and_end_offsets_never_passes_it(broker: Broker) -> None:
    # ListOffsets is only a lower bound on some brokers (the local Tansu broker answers the last
    # batch's base offset): the worker's lag takes the larger of it and the fetch highwater.
    topic = broker.settings.input_topic
    async with broker.producer() as producer:
        acks = [await producer.send(topic, value=b"%d" % i, key=b"k") for i in range(7)]
        await asyncio.gather(*acks)
    async with broker.consumer() as consumer:
        consumer.subscribe([topic], listener=Listener())
        records = await fetch(consumer, 7)
        tp = TopicPartition(topic, records[0].partition)
        end = records[-1].offset + 1
        assert consumer.highwater(tp) == end
        assert 0 < (await consumer.end_offsets([tp]))[tp] <= end
        assert await consumer.position(tp) == end


async def test_a_record_over_the_limit_is_the_projects_error(broker: Broker) -> None:
    if isinstance(broker.backend, MemoryBroker):
        broker.backend.refuse_larger_than = 2 * broker.settings.max_message_bytes + 65_536
    too_big = b"x" * (2 * broker.settings.max_message_bytes + 1_048_576 + 1)
    async with broker.producer() as producer:
        with pytest.raises(RecordTooLarge) as refused:
            await (await producer.send(broker.settings.input_topic, value=too_big, key=b"k"))
    assert refused.value.kind == "MessageSizeTooLargeError" and not refused.value.retriable


async def test_a_commit_of_a_partition_not_owned_is_refused_with_the_projects_error(broker: Broker) -> None:
    topic = broker.settings.input_topic
    async with broker.consumer() as consumer:
        await subscribed(consumer, topic)
        with pytest.raises(BrokerError) as refused:
            await consumer.commit({TopicPartition(topic + "-not-ours", 0): 1})
    # The in-memory broker says the group moved on; aiokafka checks the assignment first.
    assert type(refused.value) in (CommitFailed, NotAssigned) and refused.value.kind
