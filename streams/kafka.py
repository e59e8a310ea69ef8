"""Kafka administration from `Settings` (topics); the clients themselves are in `streams.backends.kafka`.

Lag is computed from the fetch response's high watermark (`consumer.highwater`), with
`end_offsets` (ListOffsets) only as a lower bound: some brokers (the local Tansu broker)
under-report it.
"""

from __future__ import annotations

import logging


from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from streams.backends.kafka import make_consumer, make_producer, security_kwargs  # noqa: F401  (re-exported)
from streams.config import Settings

log = logging.getLogger(__name__)


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
