"""Builds the step chain back to front: each step is handed the one after it.

    Decode ─► Batch ─► EmbedAndStore ─► Publish ─► Finish
       └──► DeadLetters ──────────────────┘

Owns: which step talks to which, and nothing else. Must not: run, fetch or commit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from processors.pipeline import Outcome, Pipeline
from schemas import InputEvent, Limits
from streams.assembly import build_mapping, build_quotas, build_tenant_source
from streams.batching import BatchPolicy, Batcher
from streams.config import Settings
from streams.offsets import OffsetTracker
from streams.steps import Fetched
from streams.steps.batch import Batch
from streams.steps.decode import Decode
from streams.steps.embed_store import EmbedAndStore
from streams.steps.finish import Finish
from streams.steps.publish import DeadLetters, Publish, Publisher
from streams.tracing import Tracing


@dataclass(frozen=True, slots=True)
class ChainHooks:
    """What the chain tells the worker's parts (telemetry, the dead-letter gate, fencing)."""

    live: Callable[[Fetched], bool]
    admit_dead_letter: Callable[[Fetched], bool]
    on_valid: Callable[[Fetched], None]
    on_key_mismatch: Callable[[Fetched], None]
    on_batch: Callable[[list[Fetched], int], None]
    on_batch_done: Callable[[list[Fetched], float], None]
    on_results: Callable[[list[tuple[Fetched, Outcome]], float], None]
    on_dead_letters: Callable[[list[Fetched], str], None]
    on_publish_error: Callable[[str, str], None]
    on_error: Callable[[BaseException], None]
    tokens: Callable[[InputEvent], int]


@dataclass(frozen=True, slots=True)
class Chain:
    decode: Decode
    batch: Batch
    embed_store: EmbedAndStore
    publish: Publish
    dead_letters: DeadLetters
    finish: Finish
    publisher: Publisher
    batcher: Batcher[Fetched]


def build_chain(
    settings: Settings, *, pipeline: Pipeline, tracker: OffsetTracker, producer: Callable[[], Any], hooks: ChainHooks,
    tracing: Tracing,
) -> Chain:
    """The worker's steps; `producer()` is the Kafka producer once the worker runs."""
    quotas = build_quotas(settings)
    batcher: Batcher[Fetched] = Batcher(
        BatchPolicy(
            min_messages=settings.batch_min_messages,
            max_messages=settings.batch_max_messages,
            min_tokens=settings.batch_min_tokens,
            max_tokens=settings.batch_max_tokens,
            min_wait_seconds=settings.batch_min_wait_ms / 1000,
            max_wait_seconds=settings.batch_max_wait_ms / 1000,
            low_lag=settings.lag_low,
            high_lag=settings.lag_high,
        ),
        # Fair across tenants (deficit round robin by tokens) and within their quotas, when tenants are configured.
        tenant_of=(lambda item: item.event.tenant if item.event is not None else None)
        if settings.tenant_from and (settings.fair_batching or quotas.active) else None,
        quotas=quotas,
    )
    finish = Finish(tracker=tracker)
    publisher = Publisher(
        send=lambda topic, key, value, headers=(): producer().send(topic, value=value, key=key, headers=headers),
        send_many=lambda topic, records: producer().send_many(topic, records),
        on_error=hooks.on_publish_error,
    )
    publish = Publish(
        publisher=publisher, finish=finish, live=hooks.live,
        output_topic=settings.output_topic, dlq_topic=settings.dlq_topic,
        dlq_max_payload_bytes=settings.dlq_max_payload_bytes,
        on_results=hooks.on_results, on_dead_letters=hooks.on_dead_letters,
        admit_dead_letter=hooks.admit_dead_letter,
    )
    dead_letters = DeadLetters(publish=publish, on_error=hooks.on_error)
    embed_store = EmbedAndStore(
        pipeline=pipeline, publish=publish, live=hooks.live, depth=settings.max_in_flight_batches, on_error=hooks.on_error,
        on_batch=lambda batch: hooks.on_batch(batch, len(embed_store.tasks)), on_batch_done=hooks.on_batch_done,
        tracing=tracing, versioned=settings.version_guard,
    )
    batch = Batch(batcher=batcher, next_step=embed_store)
    embed_store.when_a_slot_frees(batch.poll)
    limits = Limits(max_message_bytes=settings.max_message_bytes, max_text_bytes=settings.max_text_bytes)
    decode = Decode(
        next_step=batch, dead_letters=dead_letters, limits=limits, tokens=hooks.tokens, mapping=build_mapping(settings),
        tenant=build_tenant_source(settings), admit_tenant=getattr(pipeline.sink, "admit", None), on_decoded=hooks.on_valid, on_key_mismatch=hooks.on_key_mismatch,
    )
    return Chain(decode, batch, embed_store, publish, dead_letters, finish, publisher, batcher)
