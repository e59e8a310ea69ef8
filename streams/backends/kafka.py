"""The aiokafka transport: client options as data, and the clients built from them.

Owns: every aiokafka option the worker's clients get, and turning aiokafka's errors into
`streams.backends.errors` ones at this boundary (the runtime catches only those). Must not:
know the runtime.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Sequence

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from streams.backends.errors import RecordTooLarge, client_errors, from_client
from streams.config import Settings


def security_kwargs(settings: Settings) -> dict[str, Any]:
    """aiokafka keyword arguments for TLS and SASL (PLAIN, SCRAM-SHA-256/512)."""
    import ssl

    kwargs: dict[str, Any] = {"security_protocol": settings.kafka_security_protocol}
    if settings.kafka_security_protocol in ("SSL", "SASL_SSL"):
        context = ssl.create_default_context(cafile=settings.kafka_ssl_cafile or None)
        if settings.kafka_ssl_certfile:
            context.load_cert_chain(settings.kafka_ssl_certfile, settings.kafka_ssl_keyfile or None)
        kwargs["ssl_context"] = context
    if settings.kafka_security_protocol.startswith("SASL"):
        kwargs["sasl_mechanism"] = settings.kafka_sasl_mechanism
        kwargs["sasl_plain_username"] = settings.kafka_sasl_username
        kwargs["sasl_plain_password"] = settings.kafka_sasl_password
    return kwargs


def consumer_options(settings: Settings) -> dict[str, Any]:
    """The worker's consumer options, without the security ones (safe to print)."""
    return dict(
        bootstrap_servers=settings.bootstrap_servers,
        group_id=settings.group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        # aiokafka reads uncommitted by default: records of aborted transactions would become
        # points. Every consumer built here (the worker's, the tools' group-less readers) honours it.
        isolation_level=settings.isolation_level,
        max_partition_fetch_bytes=max(1_048_576, settings.max_message_bytes + 1024),
        session_timeout_ms=10_000,
        heartbeat_interval_ms=3_000,
        rebalance_timeout_ms=REBALANCE_TIMEOUT_MS,
        max_poll_interval_ms=300_000,
        # A subscribed topic missing at a rejoin (deleted, or a broker that lost its state) gets
        # no partitions until the next metadata refresh: 30 s, not aiokafka's 5 minutes, so a
        # recreated topic (or one with partitions added) is consumed again within half a minute.
        metadata_max_age_ms=30_000,
        # The broker may hold an idle fetch this long before answering (Apache Kafka answers
        # as soon as data arrives; the local Tansu broker holds the whole wait). At light
        # load aiokafka's 500 ms default, not the model, set end-to-end latency (p99 337 ms
        # in `make bench`'s latency scenario, 85 ms at 20 ms).
        fetch_max_wait_ms=settings.fetch_max_wait_ms,
        client_id="embedworker",
    )


def producer_options(settings: Settings) -> dict[str, Any]:
    """The worker's producer options, without the security ones (safe to print)."""
    return dict(
        bootstrap_servers=settings.bootstrap_servers,
        acks="all",
        linger_ms=0,  # a batch's results are queued together before the sender runs: linger only adds latency
        # A dead letter carries at most `dlq_max_payload_bytes` of the payload plus an envelope.
        max_request_size=max(1_048_576, 2 * settings.max_message_bytes + 65_536),
        request_timeout_ms=30_000,
        client_id="embedworker",
    )


REBALANCE_TIMEOUT_MS = 30_000
"""How long the group waits for members to rejoin; the revoke handler must finish well within it."""


def make_consumer(settings: Settings, **overrides: Any) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(**{**consumer_options(settings), **security_kwargs(settings), **overrides})


def make_producer(settings: Settings, **overrides: Any) -> AIOKafkaProducer:
    return AIOKafkaProducer(**{**producer_options(settings), **security_kwargs(settings), **overrides})


@dataclass(frozen=True)
class KafkaBackend:
    """aiokafka clients; `consumer_overrides` / `producer_overrides` replace options (what-if runs)."""

    consumer_overrides: dict[str, Any] = field(default_factory=dict)
    producer_overrides: dict[str, Any] = field(default_factory=dict)

    def consumer(self, settings: Settings) -> "KafkaConsumer":
        return KafkaConsumer(make_consumer(settings, **self.consumer_overrides))

    def producer(self, settings: Settings) -> "KafkaProducer":
        return KafkaProducer(make_producer(settings, **self.producer_overrides))


class KafkaConsumer:
    """aiokafka's consumer, narrowed to `streams.backends.Consumer`; its errors become `BrokerError`s."""

    def __init__(self, consumer: AIOKafkaConsumer) -> None:
        self.consumer = consumer
        self._errors = client_errors()

    async def start(self) -> None:
        try:
            await self.consumer.start()
        except self._errors as exc:
            raise from_client(exc) from exc

    async def stop(self) -> None:
        await self.consumer.stop()

    def subscribe(self, topics: list[str], listener: Any) -> None:
        self.consumer.subscribe(topics, listener=_Listener(listener))

    async def getmany(self, *partitions: Any, timeout_ms: int = 0, max_records: int | None = None) -> dict[Any, list[Any]]:
        try:
            return await self.consumer.getmany(*partitions, timeout_ms=timeout_ms, max_records=max_records)
        except self._errors as exc:
            raise from_client(exc) from exc

    def assignment(self) -> set[Any]:
        return self.consumer.assignment()

    def pause(self, *partitions: Any) -> None:
        self.consumer.pause(*partitions)

    def resume(self, *partitions: Any) -> None:
        self.consumer.resume(*partitions)

    def highwater(self, partition: Any) -> int | None:
        try:
            return self.consumer.highwater(partition)
        except self._errors as exc:
            raise from_client(exc) from exc

    async def committed(self, partition: Any) -> int | None:
        try:
            return await self.consumer.committed(partition)
        except self._errors as exc:
            raise from_client(exc) from exc

    async def commit(self, offsets: Any) -> None:
        try:
            await self.consumer.commit(offsets)
        except self._errors as exc:
            raise from_client(exc) from exc

    async def end_offsets(self, partitions: Any) -> dict[Any, int]:
        try:
            return await self.consumer.end_offsets(list(partitions))
        except self._errors as exc:
            raise from_client(exc) from exc

    async def position(self, partition: Any) -> int:
        try:
            return await self.consumer.position(partition)
        except self._errors as exc:
            raise from_client(exc) from exc


class _Listener(ConsumerRebalanceListener):
    """The runtime's listener, as the type aiokafka's `subscribe` insists on."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self.inner.on_partitions_revoked(revoked)

    async def on_partitions_assigned(self, assigned: Any) -> None:
        await self.inner.on_partitions_assigned(assigned)


def _acknowledged(ack: "asyncio.Future[Any]") -> "asyncio.Future[Any]":
    """`ack`, with a client error turned into a `BrokerError` (a callback: no task per record)."""
    translated: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    def settle(done: "asyncio.Future[Any]") -> None:
        # The exception is read first, even when nobody waits any more: else asyncio logs it as never retrieved.
        exc = None if done.cancelled() else done.exception()
        if translated.done():
            return
        if done.cancelled():
            translated.cancel()
        elif exc is not None:
            if isinstance(exc, client_errors()):
                error = from_client(exc)
                error.__cause__ = exc
                exc = error
            translated.set_exception(exc)
        else:
            translated.set_result(done.result())

    ack.add_done_callback(settle)
    # Cancelling the acknowledgement (a shutdown's gather) cancels the client's future, as before.
    translated.add_done_callback(lambda future: ack.cancel() if future.cancelled() else None)
    return translated


class KafkaProducer:
    """aiokafka's producer plus `send_many`: a batch's records as one accumulator batch per
    partition, not one `send` coroutine per record (the host path's largest per-message cost)."""

    def __init__(self, producer: AIOKafkaProducer) -> None:
        from aiokafka.partitioner import DefaultPartitioner

        self.producer = producer
        self._partitioner = DefaultPartitioner()  # the same murmur2 choice `send` (and Java clients) make
        self._round_robin = 0

    async def start(self) -> None:
        try:
            await self.producer.start()
        except client_errors() as exc:
            raise from_client(exc) from exc

    async def stop(self) -> None:
        await self.producer.stop()

    async def send(self, topic: str, value: bytes | None = None, key: bytes | None = None,
                   headers: Sequence[tuple[str, bytes]] = ()) -> Any:
        """Queue one record; the returned awaitable is its acknowledgement (`BrokerError` on failure)."""
        try:
            ack = await self.producer.send(topic, value=value, key=key, headers=list(headers) or None)
        except client_errors() as exc:
            raise from_client(exc) from exc
        return _acknowledged(ack)

    async def send_many(self, topic: str, records: Sequence[tuple[bytes | None, bytes, Sequence[tuple[str, bytes]]]]) -> list[tuple[list[int], Any]]:
        """Queue `records` (key, value, headers); returns (indices of records, acknowledgement) per batch sent."""
        try:
            return await self._send_many(topic, records)
        except client_errors() as exc:
            raise from_client(exc) from exc

    async def _send_many(self, topic: str, records: Sequence[tuple[bytes | None, bytes, Sequence[tuple[str, bytes]]]]) -> list[tuple[list[int], Any]]:
        partitions = sorted(await self.producer.partitions_for(topic))
        groups: dict[int, list[int]] = {}
        for index, (key, _, _) in enumerate(records):
            if key is None:
                partition = partitions[self._round_robin % len(partitions)]
                self._round_robin += 1
            else:
                partition = self._partitioner(key, partitions, partitions)
            groups.setdefault(partition, []).append(index)
        sent: list[tuple[list[int], Any]] = []
        for partition, indices in groups.items():
            batch, members = self.producer.create_batch(), []
            for index in indices:
                key, value, headers = records[index]
                if batch.append(key=key, value=value, timestamp=None, headers=list(headers)) is None:
                    sent.append((members, _acknowledged(await self.producer.send_batch(batch, topic, partition=partition))))
                    batch, members = self.producer.create_batch(), []
                    if batch.append(key=key, value=value, timestamp=None, headers=list(headers)) is None:
                        raise RecordTooLarge(f"a {len(value)}-byte record does not fit a batch", kind="MessageSizeTooLargeError")
                members.append(index)
            if members:
                sent.append((members, _acknowledged(await self.producer.send_batch(batch, topic, partition=partition))))
        return sent


async def ensure_topics(settings: Settings, topics: dict[str, int], replication_factor: int = 1) -> None:
    """Create missing topics with the given partition counts (existing ones are left alone)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap_servers, **security_kwargs(settings))
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [
            NewTopic(name, num_partitions=partitions, replication_factor=replication_factor)
            for name, partitions in topics.items()
            if name not in existing
        ]
        if missing:
            try:
                await admin.create_topics(missing)
            except TopicAlreadyExistsError:
                pass
    finally:
        await admin.close()
