"""Kafka clients built from `Settings`: security options, topics, and lag readings.

Only this module and the runtime know aiokafka. Lag is computed from the fetch
response's high watermark (`consumer.highwater`), not `end_offsets`, which some brokers
(the local Tansu broker) under-report.
"""

from __future__ import annotations

import logging
import ssl
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from streams.config import Settings

log = logging.getLogger(__name__)


def security_kwargs(settings: Settings) -> dict[str, Any]:
    """aiokafka keyword arguments for TLS and SASL (PLAIN, SCRAM-SHA-256/512)."""
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


def make_consumer(settings: Settings, **overrides: Any) -> AIOKafkaConsumer:
    kwargs: dict[str, Any] = dict(
        bootstrap_servers=settings.bootstrap_servers,
        group_id=settings.group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=max(1_048_576, settings.max_message_bytes + 1024),
        session_timeout_ms=10_000,
        heartbeat_interval_ms=3_000,
        rebalance_timeout_ms=30_000,
        max_poll_interval_ms=300_000,
        # The broker may hold an idle fetch this long before answering (Apache Kafka answers
        # as soon as data arrives; the local Tansu broker holds the whole wait). At light
        # load aiokafka's 500 ms default, not the model, set end-to-end latency (p99 337 ms
        # in `make bench`'s latency scenario, 85 ms at 20 ms).
        fetch_max_wait_ms=settings.fetch_max_wait_ms,
        client_id="embedworker",
        **security_kwargs(settings),
    )
    kwargs.update(overrides)
    return AIOKafkaConsumer(**kwargs)


def make_producer(settings: Settings, **overrides: Any) -> AIOKafkaProducer:
    kwargs: dict[str, Any] = dict(
        bootstrap_servers=settings.bootstrap_servers,
        acks="all",
        linger_ms=0,  # a batch's results are queued together before the sender runs: linger only adds latency
        # A dead letter carries the original payload plus an envelope.
        max_request_size=max(1_048_576, 2 * settings.max_message_bytes + 65_536),
        request_timeout_ms=30_000,
        client_id="embedworker",
        **security_kwargs(settings),
    )
    kwargs.update(overrides)
    return AIOKafkaProducer(**kwargs)


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
