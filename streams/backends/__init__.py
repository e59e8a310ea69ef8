"""Kafka behind two small protocols: the worker's consumer and producer, and where they come from.

Owns: the interface the runtime needs of a broker (what aiokafka's clients offer, narrowed).
Must not: know the pipeline. `kafka.KafkaBackend` is the real transport; `memory.MemoryBroker`
an in-process one (partitions, group offsets, rebalances) that makes the runtime's commit,
fencing and backpressure logic testable in milliseconds. Like httpx's transports: the
runtime never knows which. Both raise only `errors.BrokerError`s, never a client's own types.
"""

from __future__ import annotations

from typing import Any, Awaitable, Iterable, Mapping, Protocol, Sequence

from aiokafka import TopicPartition  # a plain named tuple; aiokafka's consumer needs its own type

from streams.backends.errors import BrokerError, BrokerUnavailable, CommitFailed, NotAssigned, RecordTooLarge

__all__ = ["Backend", "BrokerError", "BrokerUnavailable", "CommitFailed", "Consumer", "NotAssigned", "Producer",
           "RecordTooLarge", "TopicPartition"]


class Consumer(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def subscribe(self, topics: list[str], listener: Any) -> None:
        """`listener` has `on_partitions_revoked(tps)` and `on_partitions_assigned(tps)` coroutines."""
        ...

    async def getmany(self, *partitions: TopicPartition, timeout_ms: int = 0, max_records: int | None = None) -> dict[TopicPartition, list[Any]]:
        """Records (with `offset`, `timestamp`, `key`, `value`) of unpaused assigned partitions."""
        ...

    def assignment(self) -> set[TopicPartition]: ...

    def pause(self, *partitions: TopicPartition) -> None: ...

    def resume(self, *partitions: TopicPartition) -> None: ...

    def highwater(self, partition: TopicPartition) -> int | None:
        """The log end seen in the last fetch response of `partition` (None before one)."""
        ...

    async def committed(self, partition: TopicPartition) -> int | None: ...

    async def commit(self, offsets: Mapping[TopicPartition, int]) -> None: ...

    async def end_offsets(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, int]: ...

    async def position(self, partition: TopicPartition) -> int: ...


class Producer(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def send(self, topic: str, value: bytes | None = None, key: bytes | None = None,
                   headers: Sequence[tuple[str, bytes]] = ()) -> Awaitable[Any]:
        """Queue one record; the returned future resolves when the broker acknowledges it."""
        ...

    async def send_many(self, topic: str, records: Sequence[tuple[bytes | None, bytes, Sequence[tuple[str, bytes]]]]) -> list[tuple[list[int], Awaitable[Any]]]:
        """Queue many records of one topic in as few batches as fit; (record indices, acknowledgement) per batch."""
        ...


class Backend(Protocol):
    def consumer(self, settings: Any) -> Consumer: ...

    def producer(self, settings: Any) -> Producer: ...
