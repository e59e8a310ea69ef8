"""Every Prometheus metric of the worker, in one typed list.

Prefix `embedworker_`, base units, `_total` for counters, and only bounded label values:
`topic`/`partition` (bounded by the topic's partitions), `reason`, `source`, `stage`,
`operation`, `phase`, `error` (fixed sets, listed below), and `tenant`: at most
EMBEDWORKER_TENANT_METRICS_TOP values plus `other` (`streams.tenants`).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

PAUSE_REASONS = ("buffered_messages", "buffered_bytes", "in_flight_batches", "memory", "sink", "dead_letter_limit")
CACHE_HIT_SOURCES = ("redis", "batch")
DEAD_LETTER_STAGES = ("decode", "embed")
CACHE_OPERATIONS = ("get", "set")
MIGRATION_PHASES = ("none", "backfill", "dual", "cutover", "rolled_back", "finished")
COMMIT_ERRORS = ("rebalance", "unknown_topic", "unavailable", "other")

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Metrics:
    """The worker's metrics, registered in their own registry (several workers may share a process in tests)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.messages_consumed = Counter(
            "embedworker_messages_consumed_total", "Messages fetched from the input topic", registry=r
        )
        self.messages_processed = Counter(
            "embedworker_messages_processed_total", "Messages embedded, upserted and answered with a result event", registry=r
        )
        self.messages_failed = Counter(
            "embedworker_messages_failed_total", "Messages that could not be processed (all are dead-lettered)", registry=r
        )
        self.messages_dead_lettered = Counter(
            "embedworker_messages_dead_lettered_total",
            "Dead-letter events acknowledged by the broker, by stage",
            ["stage"],
            registry=r,
        )
        self.cache_hits = Counter(
            "embedworker_cache_hits_total", "Texts not embedded because their vector was known, by source", ["source"], registry=r
        )
        self.cache_misses = Counter("embedworker_cache_misses_total", "Distinct texts that had to be embedded", registry=r)
        self.cache_errors = Counter(
            "embedworker_cache_errors_total", "Redis operations that failed (the worker went on without the cache)", ["operation"], registry=r
        )
        self.publish_errors = Counter(
            "embedworker_publish_errors_total",
            "Records the broker did not acknowledge, by kind (result, dead_letter) and error class",
            ["kind", "error"],
            registry=r,
        )
        self.model_errors = Counter(
            "embedworker_model_errors_total", "Failed forward passes (retried; a text is dead-lettered only while others embed)",
            registry=r,
        )
        self.tenant_messages = Counter(
            "embedworker_tenant_messages_total",
            "Messages processed per tenant (the EMBEDWORKER_TENANT_METRICS_TOP largest; the rest: other)", ["tenant"], registry=r,
        )
        self.tenant_tokens = Counter(
            "embedworker_tenant_tokens_total", "Estimated tokens of the messages processed, per tenant (top N, other)",
            ["tenant"], registry=r,
        )
        self.tenant_dead_letters = Counter(
            "embedworker_tenant_dead_letters_total", "Dead letters of events with a tenant, per tenant (top N, other)",
            ["tenant"], registry=r,
        )
        self.tenant_latency = Histogram(
            "embedworker_tenant_latency_seconds", "Broker timestamp to result, per tenant (top N, other)", ["tenant"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.migration_phase = Gauge(
            "embedworker_migration_phase", "1 for the phase of the collection's model migration (none when there is none)",
            ["phase"], registry=r,
        )
        self.migration_shadow_lag = Gauge(
            "embedworker_migration_shadow_lag_messages",
            "Messages the shadow consumer group of a migration has yet to write (this worker's partitions)", registry=r,
        )
        self.migration_shadow_processed = Counter(
            "embedworker_migration_shadow_processed_total", "Messages the shadow consumer group wrote to the new collection",
            registry=r,
        )
        self.migration_errors = Counter(
            "embedworker_migration_errors_total",
            "Shadow workers that stopped on an error (started again) and unreadable migration records", registry=r,
        )
        self.documents_deleted = Counter(
            "embedworker_documents_deleted_total", "Delete events applied (tombstones and op=delete)", registry=r
        )
        self.chunks_written = Counter(
            "embedworker_chunks_written_total", "Chunk points written to the store", registry=r
        )
        self.sink_errors = Counter("embedworker_sink_errors_total", "Failed upsert attempts (retried)", registry=r)
        self.store_rejected = Counter(
            "embedworker_store_rejected_total", "Documents the store refused on their merits (dead-lettered as store_rejected)", registry=r
        )
        self.headers_dropped = Counter(
            "embedworker_headers_dropped_total",
            "Input headers not copied onto results and dead letters: malformed, or over their size cap", registry=r,
        )
        self.key_id_mismatches = Counter(
            "embedworker_key_id_mismatches_total", "Keyed upserts whose key is not their id (per-id order needs key = id)",
            registry=r,
        )
        self.payload_only_writes = Counter(
            "embedworker_payload_only_writes_total",
            "Updates of a one-chunk document whose text was unchanged: only the payload was rewritten, the vector kept",
            registry=r,
        )
        self.stale_writes_skipped = Counter(
            "embedworker_stale_writes_skipped_total",
            "Document writes skipped because the store held a newer version (a replay, a zombie writer, a slow backfill)",
            registry=r,
        )
        self.cache_invalid = Counter(
            "embedworker_cache_invalid_total", "Cached values refused (not finite or not of unit norm) and embedded again", registry=r
        )
        self.texts_embedded = Counter("embedworker_texts_embedded_total", "Texts run through the model", registry=r)
        self.batch_size = Histogram(
            "embedworker_batch_size_messages", "Messages per micro-batch", buckets=_BATCH_BUCKETS, registry=r
        )
        self.embed_seconds = Histogram(
            "embedworker_embed_duration_seconds", "Time to embed one batch's cache misses", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.upsert_seconds = Histogram(
            "embedworker_upsert_duration_seconds", "Time of one successful upsert", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.batch_seconds = Histogram(
            "embedworker_batch_duration_seconds", "Time from batch close to all results acknowledged", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.end_to_end_seconds = Histogram(
            "embedworker_end_to_end_latency_seconds",
            "From the input message's timestamp to its result acknowledged",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.consumer_lag_records = Gauge(
            "embedworker_consumer_lag_records",
            "Log end (the larger of the fetch highwater and ListOffsets) minus the committed offset",
            ["topic", "partition"],
            registry=r,
        )
        self.consumer_lag_seconds = Gauge(
            "embedworker_consumer_lag_seconds",
            "Age of the oldest fetched but unfinished message (0 when caught up)",
            ["topic", "partition"],
            registry=r,
        )
        self.partition_assigned = Gauge(
            "embedworker_partition_assigned",
            "1 while this worker has the partition, 0 after it was revoked",
            ["topic", "partition"],
            registry=r,
        )
        self.commits = Counter("embedworker_offset_commits_total", "Successful offset commits", registry=r)
        self.commit_failures = Counter(
            "embedworker_offset_commit_failures_total",
            "Offset commits the broker refused or did not answer (retried), by error: " + ", ".join(COMMIT_ERRORS),
            ["error"],
            registry=r,
        )
        self.backpressure_paused = Gauge(
            "embedworker_backpressure_paused", "1 while the assigned partitions are paused", registry=r
        )
        self.backpressure_reason = Gauge(
            "embedworker_backpressure_reason_active", "1 while this reason holds the consumer paused", ["reason"], registry=r
        )
        self.pauses = Counter("embedworker_backpressure_pauses_total", "Transitions to paused", registry=r)
        self.dead_letter_breaker_open = Gauge(
            "embedworker_dead_letter_breaker_open",
            "1 once the dead-letter limit tripped: consumption paused and dead letters held, until a restart",
            registry=r,
        )
        self.dead_letter_breaker_trips = Counter(
            "embedworker_dead_letter_breaker_trips_total", "Times the dead-letter limit tripped", registry=r
        )
        self.dead_letter_breaker_held = Gauge(
            "embedworker_dead_letter_breaker_held_messages",
            "Messages held instead of dead-lettered while the breaker is open (uncommitted: replayed after a restart)",
            registry=r,
        )
        self.buffered_messages = Gauge("embedworker_buffered_messages", "Messages fetched and not yet finished", registry=r)
        self.buffered_bytes = Gauge("embedworker_buffered_bytes", "Bytes of messages fetched and not yet finished", registry=r)
        self.in_flight_batches = Gauge("embedworker_in_flight_batches", "Batches being processed", registry=r)
        self.rss_bytes = Gauge("embedworker_process_resident_memory_bytes", "Resident set size of the worker", registry=r)
        self.batch_target_messages = Gauge(
            "embedworker_batch_target_messages", "Current adaptive batch size limit", registry=r
        )
        self.batch_target_tokens = Gauge(
            "embedworker_batch_token_budget_tokens", "Current adaptive token budget of a batch", registry=r
        )
        for reason in PAUSE_REASONS:
            self.backpressure_reason.labels(reason=reason).set(0)
        for source in CACHE_HIT_SOURCES:
            self.cache_hits.labels(source=source)
        for stage in DEAD_LETTER_STAGES:
            self.messages_dead_lettered.labels(stage=stage)
        for operation in CACHE_OPERATIONS:
            self.cache_errors.labels(operation=operation)
        for phase in MIGRATION_PHASES:
            self.migration_phase.labels(phase=phase).set(1 if phase == "none" else 0)

    def serve(self, *, port: int, host: str = "127.0.0.1") -> None:
        """Expose `/metrics` on a background thread."""
        start_http_server(port, addr=host, registry=self.registry)
