"""What a worker tells about itself: run totals (`RunStats`), measurement hooks (`WorkerObserver`)
and the metrics updates of every step and of the pipeline.

Owns: the mapping from events of the run (a batch launched, results published, dead letters, a
cache lookup, a key that is not its id) to Prometheus metrics, `RunStats` and the observer.
Must not: decide anything; every call is cheap and runs on the event loop.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from streams.backends import TopicPartition

from processors.pipeline import Outcome, PipelineHooks
from streams.metrics import Metrics
from streams.steps import Fetched
from streams.tenants import TenantLabels
from streams.tracing import Tracing

log = logging.getLogger("streams.runtime")


@dataclass(slots=True)
class RunStats:
    """Totals for summaries (the demo, benchmarks); Prometheus has the same as metrics."""

    consumed: int = 0
    processed: int = 0
    cached: int = 0
    truncated: int = 0
    dead_letters: int = 0
    batches: int = 0
    batch_sizes: deque[int] = field(default_factory=lambda: deque(maxlen=10_000))
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=50_000))
    pauses: int = 0
    resumes: int = 0
    pause_reasons: dict[str, int] = field(default_factory=dict)
    max_rss_bytes: int = 0


@dataclass(slots=True)
class WorkerObserver:
    """Public hooks for measurements (the bench): called on the event loop, so keep them cheap."""

    on_fetch_round: Callable[[], None] = lambda: None
    on_consumed: Callable[[], None] = lambda: None
    """A partition's fetched messages are about to enter the steps (once per partition and fetch)."""
    on_batch_done: Callable[[int], None] = lambda messages: None
    on_published: Callable[[list[tuple[TopicPartition, int]]], None] = lambda positions: None
    """Results acknowledged by the broker: (partition, offset) of each input message."""
    on_revoked: Callable[[list[TopicPartition]], None] = lambda partitions: None
    """Partitions fenced: called as the revoke handler returns."""


class Telemetry:
    """The run's counters: `stats` for summaries, `metrics` for Prometheus, `observer` for the bench."""

    def __init__(
        self, *, metrics: Metrics, observer: WorkerObserver, tracing: Tracing, tenants_top: int = 20,
        tokens: Callable[[Any], int] = lambda event: 0,
    ) -> None:
        self.metrics = metrics
        self.tenants = TenantLabels(tenants_top)
        self.tokens = tokens
        self.observer = observer
        self.tracing = tracing
        self.stats = RunStats()
        self._warned_key_mismatch: set[TopicPartition] = set()

    def pipeline_hooks(self, *, on_sink_state: Callable[[bool], None]) -> PipelineHooks:
        m = self.metrics
        return PipelineHooks(
            on_cache=self.count_cache,
            on_embed=lambda texts, seconds: (m.texts_embedded.inc(texts), m.embed_seconds.observe(seconds)),
            on_upsert=lambda points, seconds: (m.chunks_written.inc(points), m.upsert_seconds.observe(seconds)),
            on_sink_error=m.sink_errors.inc,
            on_sink_state=on_sink_state,
            on_model_error=m.model_errors.inc,
            on_cache_invalid=m.cache_invalid.inc,
            on_store_rejected=m.store_rejected.inc,
            on_stale=m.stale_writes_skipped.inc,
            on_payload_only=m.payload_only_writes.inc,
            phase=self.tracing.phase,
        )

    def count_cache(self, redis_hits: int, batch_hits: int, misses: int) -> None:
        self.metrics.cache_hits.labels(source="redis").inc(redis_hits)
        self.metrics.cache_hits.labels(source="batch").inc(batch_hits)
        self.metrics.cache_misses.inc(misses)

    def consumed(self, count: int) -> None:
        """Messages registered (not re-fetched ones already in flight), a fetched partition batch at a time."""
        self.stats.consumed += count
        self.metrics.messages_consumed.inc(count)

    def batch_launched(self, batch: list[Fetched], in_flight: int) -> None:
        self.metrics.batch_size.observe(len(batch))
        self.stats.batches += 1
        self.stats.batch_sizes.append(len(batch))
        self.metrics.in_flight_batches.set(in_flight)

    def batch_done(self, batch: list[Fetched], seconds: float) -> None:
        self.metrics.batch_seconds.observe(seconds)
        self.observer.on_batch_done(len(batch))

    def results(self, results: list[tuple[Fetched, Outcome]], finished_at: float) -> None:
        stats, observe = self.stats, self.metrics.end_to_end_seconds.observe
        for item, outcome in results:
            stats.processed += 1
            stats.cached += int(outcome.result.cached)  # type: ignore[union-attr]
            stats.truncated += int(outcome.result.truncated)  # type: ignore[union-attr]
            latency = max(0.0, finished_at - item.timestamp)
            stats.latencies.append(latency)
            observe(latency)
            if outcome.event.tenant is not None:
                self._count_tenant(outcome.event, latency)
        self.metrics.messages_processed.inc(len(results))
        deletes = sum(1 for _, o in results if o.event.is_delete)
        if deletes:
            self.metrics.documents_deleted.inc(deletes)
        self.observer.on_published([(item.tp, item.offset) for item, _ in results])

    def _count_tenant(self, event: Any, latency: float) -> None:
        label = self.tenants.label(event.tenant)
        m = self.metrics
        m.tenant_messages.labels(tenant=label).inc()
        m.tenant_tokens.labels(tenant=label).inc(self.tokens(event))
        m.tenant_latency.labels(tenant=label).observe(latency)

    def dead_letters(self, items: list[Fetched], stage: str) -> None:
        count = len(items)
        for item in items:
            if item.event is not None and item.event.tenant is not None:
                self.metrics.tenant_dead_letters.labels(tenant=self.tenants.label(item.event.tenant, 0)).inc()
        self.stats.dead_letters += count
        self.metrics.messages_failed.inc(count)
        self.metrics.messages_dead_lettered.labels(stage=stage).inc(count)

    def key_mismatch(self, item: Fetched) -> None:
        self.metrics.key_id_mismatches.inc()
        if item.tp not in self._warned_key_mismatch:
            self._warned_key_mismatch.add(item.tp)
            log.warning(
                "%s[%d] offset %d: the record's key is not its event's id; per-id order holds only when key = id "
                "(a tombstone and an upsert of one id may land on different partitions and swap); "
                "counted in embedworker_key_id_mismatches_total, logged once per partition",
                item.tp.topic, item.tp.partition, item.offset,
            )

    def partition_released(self, tp: TopicPartition) -> None:
        labels = {"topic": tp.topic, "partition": str(tp.partition)}
        self.metrics.consumer_lag_records.labels(**labels).set(0)
        self.metrics.consumer_lag_seconds.labels(**labels).set(0)
        self.metrics.partition_assigned.labels(**labels).set(0)
