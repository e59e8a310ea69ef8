"""An in-process broker: topics of partitions, consumer groups with committed offsets, rebalances.

Owns: a faithful-enough model of what the runtime relies on, for unit tests in milliseconds:
- records keep their offsets; a `control` record (a transaction marker) takes an offset but
  is never returned, as on a broker with transactional producers;
- group members get partitions round-robin; a rebalance (a member joins or leaves, or
  `rebalance()`) revokes every member's partitions (its listener runs) before anyone gets
  them again, like Kafka's eager protocol with its join barrier;
- a commit for a partition the member no longer owns fails (`CommitFailed`);
- `fail_sends` makes the producer's acknowledgements fail (retriable), `refuse_larger_than`
  refuses records above a size (not retriable), as a broker's `message.max.bytes` does.
Must not: be used outside tests and benchmarks.
"""

from __future__ import annotations

import asyncio
import time
import zlib
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from streams.backends import TopicPartition
from streams.backends.errors import BrokerUnavailable, CommitFailed, RecordTooLarge


@dataclass(frozen=True, slots=True)
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp: int
    control: bool = False
    headers: tuple[tuple[str, bytes], ...] = ()


@dataclass
class _Group:
    members: list["MemoryConsumer"] = field(default_factory=list)
    committed: dict[TopicPartition, int] = field(default_factory=dict)
    generation: int = 0
    owners: dict[TopicPartition, "MemoryConsumer"] = field(default_factory=dict)


class MemoryBroker:
    """Topics, groups and the clients that talk to them (`consumer()`, `producer()`: the `Backend` protocol)."""

    def __init__(self) -> None:
        self.logs: dict[str, list[list[Record]]] = {}
        self.groups: dict[str, _Group] = {}
        self.fail_sends = False
        self.refuse_larger_than: int | None = None
        self._data = asyncio.Event()
        self._round_robin = 0

    # ---- topics -------------------------------------------------------------------------

    def create_topic(self, name: str, partitions: int = 1) -> None:
        self.logs.setdefault(name, [[] for _ in range(partitions)])

    def append(self, topic: str, value: bytes | None, key: bytes | None = None, *, partition: int | None = None,
               control: bool = False, headers: tuple[tuple[str, bytes], ...] = ()) -> Record:
        partitions = self.logs.setdefault(topic, [[]])
        if partition is None:
            if key is not None:
                partition = zlib.crc32(key) % len(partitions)
            else:
                partition, self._round_robin = self._round_robin % len(partitions), self._round_robin + 1
        log = partitions[partition]
        record = Record(topic, partition, len(log), key, value, int(time.time() * 1000), control, tuple(headers))
        log.append(record)
        self._data.set()
        return record

    def records(self, topic: str) -> list[Record]:
        return [r for log in self.logs.get(topic, []) for r in log if not r.control]

    def end(self, tp: TopicPartition) -> int:
        return len(self.logs[tp.topic][tp.partition])

    def committed(self, group_id: str, tp: TopicPartition) -> int | None:
        return self.groups.get(group_id, _Group()).committed.get(tp)

    # ---- groups -------------------------------------------------------------------------

    def rebalance(self, group_id: str) -> None:
        """Make every member of the group give up its partitions on its next fetch and take a new share."""
        self.groups.setdefault(group_id, _Group()).generation += 1
        self._data.set()

    def _share(self, group: _Group, member: "MemoryConsumer") -> set[TopicPartition]:
        tps = sorted(
            (TopicPartition(topic, p) for topic in member.topics for p in range(len(self.logs.get(topic, [])))),
            key=lambda tp: (tp.topic, tp.partition),
        )
        index = group.members.index(member)
        return {tp for i, tp in enumerate(tps) if i % len(group.members) == index}

    # ---- the Backend protocol -------------------------------------------------------------

    def consumer(self, settings: Any) -> "MemoryConsumer":
        return MemoryConsumer(self, group_id=settings.group_id)

    def producer(self, settings: Any) -> "MemoryProducer":
        return MemoryProducer(self)


class MemoryConsumer:
    def __init__(self, broker: MemoryBroker, *, group_id: str) -> None:
        self.broker = broker
        self.group_id = group_id
        self.topics: list[str] = []
        self._listener: Any = None
        self._assignment: set[TopicPartition] = set()
        self._positions: dict[TopicPartition, int] = {}
        self._highwater: dict[TopicPartition, int] = {}
        self._paused: set[TopicPartition] = set()
        self._generation = -1
        self._closed = False

    @property
    def _group(self) -> _Group:
        return self.broker.groups.setdefault(self.group_id, _Group())

    async def start(self) -> None:
        return None

    def subscribe(self, topics: list[str], listener: Any = None) -> None:
        self.topics = list(topics)
        self._listener = listener
        self._group.members.append(self)
        self.broker.rebalance(self.group_id)

    async def _rejoin(self) -> None:
        group = self._group
        if self._assignment and self._listener is not None:
            await self._listener.on_partitions_revoked(set(self._assignment))
        for tp in self._assignment:
            if group.owners.get(tp) is self:
                del group.owners[tp]
        self._assignment = set()
        generation = group.generation
        share = self.broker._share(group, self)
        # The join barrier: a partition is handed over only once its previous owner let go.
        while any(group.owners.get(tp) not in (None, self) for tp in share):
            await asyncio.sleep(0.001)  # other members revoke on their own next fetch
            if group.generation != generation:
                return await self._rejoin()
        for tp in share:
            group.owners[tp] = self
            committed = group.committed.get(tp)
            self._positions[tp] = committed if committed is not None else 0
        self._assignment = share
        self._paused &= share
        self._generation = generation
        if self._listener is not None:
            await self._listener.on_partitions_assigned(set(share))

    async def getmany(self, *partitions: TopicPartition, timeout_ms: int = 0, max_records: int | None = None) -> dict[TopicPartition, list[Record]]:
        if self._generation != self._group.generation:
            await self._rejoin()
        deadline = time.monotonic() + timeout_ms / 1000
        while True:
            found = self._take(partitions, max_records)
            if found or time.monotonic() >= deadline or self._generation != self._group.generation:
                return found
            self.broker._data.clear()
            try:
                await asyncio.wait_for(self.broker._data.wait(), timeout=max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                pass

    def _take(self, partitions: tuple[TopicPartition, ...], max_records: int | None) -> dict[TopicPartition, list[Record]]:
        found: dict[TopicPartition, list[Record]] = {}
        budget = max_records or 500
        for tp in sorted(partitions or self._assignment, key=lambda t: (t.topic, t.partition)):
            if tp not in self._assignment or tp in self._paused or budget <= 0:
                continue
            log = self.broker.logs[tp.topic][tp.partition]
            start = self._positions.get(tp, 0)
            chunk = log[start : start + budget]
            self._highwater[tp] = len(log)
            if not chunk:
                continue
            self._positions[tp] = start + len(chunk)
            visible = [r for r in chunk if not r.control]
            budget -= len(visible)
            if visible:
                found[tp] = visible
        return found

    def assignment(self) -> set[TopicPartition]:
        return set(self._assignment)

    def pause(self, *partitions: TopicPartition) -> None:
        self._paused.update(partitions)

    def resume(self, *partitions: TopicPartition) -> None:
        self._paused.difference_update(partitions)

    def paused(self) -> set[TopicPartition]:
        return set(self._paused)

    def highwater(self, partition: TopicPartition) -> int | None:
        return self._highwater.get(partition)

    async def committed(self, partition: TopicPartition) -> int | None:
        return self._group.committed.get(partition)

    async def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        group = self._group
        if self._generation != group.generation or any(group.owners.get(tp) is not self for tp in offsets):
            raise CommitFailed("the group rebalanced: this member no longer owns every partition it commits")
        group.committed.update(offsets)

    async def end_offsets(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: self.broker.end(tp) for tp in partitions}

    async def position(self, partition: TopicPartition) -> int:
        return self._positions[partition]

    async def stop(self) -> None:
        if self._closed:
            return
        self._closed = True
        group = self._group
        if self in group.members:
            group.members.remove(self)
        for tp in self._assignment:
            if group.owners.get(tp) is self:
                del group.owners[tp]
        self._assignment = set()
        self.broker.rebalance(self.group_id)


class MemoryProducer:
    def __init__(self, broker: MemoryBroker) -> None:
        self.broker = broker
        self.sent = 0
        self.records: list[tuple[float, Record]] = []
        """What this producer got acknowledged, with time.monotonic() of the acknowledgement."""
        self.fail_sends = False
        """This producer's acknowledgements fail (retriable), like the broker-wide `fail_sends`."""

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def send(self, topic: str, value: bytes | None = None, key: bytes | None = None,
                   headers: Any = ()) -> "asyncio.Future[Record]":
        future: asyncio.Future[Record] = asyncio.get_running_loop().create_future()
        # As Kafka counts a record: headers too.
        size = len(value or b"") + len(key or b"") + sum(len(k) + len(v or b"") for k, v in headers or ())
        if self.broker.refuse_larger_than is not None and size > self.broker.refuse_larger_than:
            future.set_exception(RecordTooLarge(f"record of {size} bytes", kind="MessageSizeTooLargeError"))
        elif self.broker.fail_sends or self.fail_sends:
            future.set_exception(BrokerUnavailable("injected: broker unreachable", kind="KafkaConnectionError"))
        else:
            record = self.broker.append(topic, value, key, headers=tuple(headers or ()))
            future.set_result(record)
            self.records.append((time.monotonic(), record))
            self.sent += 1
        return future

    async def send_many(self, topic: str, records: list[tuple[bytes | None, bytes]]) -> list[tuple[list[int], "asyncio.Future[Any]"]]:
        return [([i], await self.send(topic, value=value, key=key, headers=headers)) for i, (key, value, headers) in enumerate(records)]
