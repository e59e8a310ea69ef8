"""Settings from flags or `EMBEDWORKER_*` environment variables, from one table of options.

The same table builds the CLI flags, the environment lookup and the README's
configuration table. A bad value raises `ConfigError` naming the setting; the CLI prints
that one line and exits 2. Every number has a finite range (`Range`), enforced on env
values, flags and typed overrides alike and stated in its help. Secret values never
appear in `repr`, logs or errors.
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass, fields
from typing import Any, Callable, Mapping

ENV_PREFIX = "EMBEDWORKER_"


class ConfigError(Exception):
    def __init__(self, setting: str, message: str) -> None:
        super().__init__(f"invalid setting {setting}: {message}")
        self.setting = setting


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


def _choice(*allowed: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in allowed:
            raise ValueError(f"expected one of {', '.join(allowed)}")
        return text

    return parse


_KIB, _MIB, _GIB, _TIB = 1024, 1024**2, 1024**3, 1024**4
_BINARY_UNITS = ((_TIB, "TiB"), (_GIB, "GiB"), (_MIB, "MiB"), (_KIB, "KiB"))


def _number(value: float) -> str:
    if value == int(value):
        return str(int(value))
    return f"{value:g}"


@dataclass(frozen=True)
class Range:
    """A number option's parser and its documented bounds, in one object.

    `float()` takes `inf`, `nan` and `1e-12`: unchecked, they stop periodic commits, spin a
    loop or make a deadline that never comes. So every number is finite and within
    [lo, hi]; `off` also allows 0, where 0 switches the feature off but small values are
    absurd (a 1-byte memory budget pauses forever).
    """

    lo: float
    hi: float
    integer: bool
    unit: str = ""
    off: bool = False

    def __call__(self, text: str) -> int | float:
        try:
            value: int | float = int(text) if self.integer else float(text)
        except ValueError:
            kind = "a whole number" if self.integer else "a number"
            raise ValueError(f"expected {kind} {self.between()}") from None
        return self.check(value)

    def check(self, value: int | float) -> int | float:
        """`value` if finite and in range, else ValueError (typed overrides skip `__call__`)."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"expected a number {self.between()}")
        inside = math.isfinite(value) and (self.lo <= value <= self.hi or (self.off and value == 0))
        if not inside:
            raise ValueError(f"must be {self.between()}")
        return value

    def _show(self, value: float) -> str:
        # Bytes as typed (the variable takes digits) with the binary size a reader recognizes.
        if self.unit == "bytes" and value:
            for size, name in _BINARY_UNITS:
                if value % size == 0:
                    return f"{_number(value)} ({_number(value // size)} {name})"
        return _number(value)

    def _unit(self) -> str:
        return f" {self.unit}" if self.unit else ""

    def between(self) -> str:
        """For errors: `between 10 and 60000 ms`, `0 (off) or between ...`."""
        text = f"between {self._show(self.lo)} and {self._show(self.hi)}{self._unit()}"
        return f"0 (off) or {text}" if self.off else text

    def span(self) -> str:
        """For the docs: `10 to 60000 ms`, `0 (off) or ...`."""
        text = f"{self._show(self.lo)} to {self._show(self.hi)}{self._unit()}"
        return f"0 (off) or {text}" if self.off else text


def _int_in(lo: int, hi: int, unit: str = "", *, off: bool = False) -> Range:
    return Range(lo, hi, integer=True, unit=unit, off=off)


def _float_in(lo: float, hi: float, unit: str = "", *, off: bool = False) -> Range:
    return Range(lo, hi, integer=False, unit=unit, off=off)


_RETRY_SECONDS = _float_in(0.01, 3600, "s")
_BATCH_MESSAGES = _int_in(1, 100_000, "messages")
# The top is a "no limit" for benchmarks (bench/scenarios/mixed_lengths.py: FIXED_COUNT_SETTINGS).
_BATCH_TOKENS = _int_in(1, 1_000_000_000, "tokens")
_BATCH_WAIT_MS = _float_in(0.1, 60_000, "ms")
_LAG_RECORDS = 1_000_000_000
_MESSAGE_BYTES = 100 * _MIB


def _nonempty(text: str) -> str:
    if not text.strip():
        raise ValueError("must not be empty")
    return text.strip()


def _text(text: str) -> str:
    return text


def _payload_indexes(text: str) -> str:
    from processors.sink import parse_payload_indexes

    parse_payload_indexes(text)  # a bad entry is a start-up error naming the setting
    return text


@dataclass(frozen=True)
class Option:
    name: str
    default: Any
    parse: Callable[[str], Any]
    help: str
    secret: bool = False

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def doc(self) -> str:
        """The help with a number's range, so flags and the README state the bounds the parser enforces."""
        if isinstance(self.parse, Range):
            return f"{self.help}; {self.parse.span()}"
        return self.help


OPTIONS: tuple[Option, ...] = (
    Option("bootstrap_servers", "localhost:9092", _nonempty, "Kafka bootstrap servers, comma-separated"),
    Option("input_topic", "texts", _nonempty, "Topic of input text events"),
    Option("output_topic", "embeddings", _nonempty, "Topic of result events"),
    Option("dlq_topic", "texts.dlq", _nonempty, "Dead-letter topic"),
    Option("group_id", "embedworker", _nonempty, "Kafka consumer group"),
    Option("isolation_level", "read_committed", _choice("read_committed", "read_uncommitted"),
           "Which records the consumers read: read_committed (the collection mirrors committed data only: records of aborted "
           "transactions are skipped, those of open ones wait for the commit) or read_uncommitted (aborted records too)"),
    Option("kafka_security_protocol", "PLAINTEXT", _choice("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"), "Kafka security protocol"),
    Option("kafka_sasl_mechanism", "PLAIN", _choice("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"), "SASL mechanism"),
    Option("kafka_sasl_username", "", _text, "SASL user name"),
    Option("kafka_sasl_password", "", _text, "SASL password", secret=True),
    Option("kafka_ssl_cafile", "", _text, "CA bundle to verify the brokers (TLS)"),
    Option("kafka_ssl_certfile", "", _text, "Client certificate (mutual TLS)"),
    Option("kafka_ssl_keyfile", "", _text, "Client private key (mutual TLS)"),
    Option("redis_url", "", _text, "Redis URL for the vector cache (redis:// or rediss://); empty: no cache", secret=True),
    Option("cache_ttl_seconds", 7 * 24 * 3600, _int_in(1, 365 * 24 * 3600, "s"), "Lifetime of a cached vector (at most a year)"),
    Option("cache_dtype", "float32", _choice("float32", "float16"), "Stored vector precision in Redis"),
    Option("qdrant_url", "", _text, "Qdrant server URL (https:// for TLS)"),
    Option("qdrant_api_key", "", _text, "Qdrant API key", secret=True),
    Option("qdrant_path", "", _text, "Directory of an embedded Qdrant store (when no URL); empty: in memory"),
    Option("qdrant_engine", "edge", _choice("local", "edge"),
           "Engine of the embedded path store: edge (qdrant-edge, one shard per collection) or local (qdrant-client, sqlite)"),
    Option("collection", "texts", _nonempty, "Qdrant collection"),
    Option("store_text", True, _bool, "Keep the text in the point payload"),
    Option("version_guard", True, _bool,
           "Store writes apply only where the stored document is not newer (by input offset within a partition): "
           "a replay, a zombie writer after a rebalance or a slow backfill never goes back in time; off after a "
           "topic is re-created (its offsets restart)"),
    Option("payload_indexes", "", _payload_indexes,
           "Extra payload indexes, field:kind,... (kinds: keyword, integer, float, bool, datetime, text, uuid); id and chunk_index always"),
    Option("sparse", "off", _choice("off", "bm25"),
           "A sparse vector per point beside the dense one, for keyword and hybrid search (search --sparse, --hybrid): "
           "off, or bm25 (qdrant-edge's BM25 tokenizer; IDF in the engine)"),
    Option("versioned_collections", False, _bool,
           "Create a new collection as <collection>__<model>__1 behind an alias named EMBEDWORKER_COLLECTION, which every "
           "read and write goes through (qdrant-edge: the path's aliases.json); an existing collection or alias is used as it is"),
    Option("quantization", "none", _choice("none", "int8", "binary"),
           "Quantization of a new collection's vectors: none, int8 (scalar) or binary, the quantized copy kept in RAM "
           "(a Qdrant server and qdrant-edge; qdrant-client's local engine ignores it); an existing collection keeps its own"),
    Option("long_text", "chunk", _choice("chunk", "truncate"),
           "A text over the model's token limit: chunk (several points) or truncate (its first tokens)"),
    Option("chunk_overlap_tokens", 32, _int_in(0, 4096, "tokens"),
           "Tokens a chunk repeats from the end of the previous one (at most half a chunk is used)"),
    Option("embed_retry_seconds", 1.0, _RETRY_SECONDS,
           "How long a failing batch is retried before a probe text tells a poison text from a model outage"),
    Option("input_format", "json", _choice("json", "debezium"),
           "How a record is read: json (the native event, or mapped by the *_FROM settings) or debezium (change events: "
           "c/r/u upsert the row in after, d deletes the row of before, t is refused)"),
    Option("id_from", "", _text,
           "Where the id is read: a dotted path (doc_id, after.id), key (the record key), or key.<path> (a JSON key's "
           "field); numbers become their decimal text (default: id)"),
    Option("text_from", "", _text,
           "Where the text is read: a path, paths joined by a blank line (title,body), or a template ({title}\\n\\n{body}); "
           "a missing field is an empty part (default: text)"),
    Option("metadata_from", "", _text,
           "Where the metadata is read: metadata (the object, default) or paths and trailing wildcards (lang,tags,author.*)"),
    Option("version_from", "", _text,
           "The event's own version for the version guard: a path or header:<name>, alternatives with | "
           "(default: the input offset; debezium: source.lsn|source.ts_ms)"),
    Option("tenant_from", "", _text,
           "Where an event's tenant is read: a dotted path (tenant, metadata.org) or header:<name>; a tombstone's from "
           "the header, else from its key <tenant>/<id>. Empty (default): one tenant, as before"),
    Option("tenancy", "payload", _choice("payload", "collection"),
           "With EMBEDWORKER_TENANT_FROM: payload (one collection, a tenant field indexed as the tenant key, the tenant "
           "in every point id, deletes and chunk cleanup scoped to the tenant) or collection (a collection per tenant, "
           "named by EMBEDWORKER_COLLECTION_TEMPLATE, created on first use)"),
    Option("collection_template", "{collection}_{tenant}", _text,
           "EMBEDWORKER_TENANCY=collection: the name of a tenant's collection ({collection}: EMBEDWORKER_COLLECTION, {tenant})"),
    Option("max_tenant_collections", 100, _int_in(1, 100_000, "collections"),
           "EMBEDWORKER_TENANCY=collection: tenants a worker process gives a collection; a new tenant past it is a dead "
           "letter tenant_limit"),
    Option("cache_scope", "tenant", _choice("tenant", "global"),
           "With EMBEDWORKER_TENANT_FROM: tenant (the Redis cache keyed per tenant: a cached result reveals nothing "
           "across tenants) or global (identical texts share vectors across tenants: a side channel)"),
    Option("fair_batching", True, _bool,
           "With EMBEDWORKER_TENANT_FROM: fill batches across the buffered tenants by deficit round robin (by tokens), "
           "so a tenant's backlog does not hold back the others' events (only different ids are reordered)"),
    Option("tenant_tokens_per_second", 0, _int_in(0, 1_000_000_000, "tokens/s", off=True),
           "With EMBEDWORKER_TENANT_FROM: each tenant's share of the model, in estimated tokens a second (0: none); a tenant "
           "over it is delayed, never dropped, and its partitions' commits wait for it"),
    Option("tenant_quotas_file", "", _text,
           "With EMBEDWORKER_TENANT_FROM: a JSON object of tenant: tokens per second overriding EMBEDWORKER_TENANT_TOKENS_PER_SECOND"),
    Option("tenant_metrics_top", 20, _int_in(0, 1000, "tenants"),
           "Tenants with their own label in the per-tenant metrics, the largest by messages (the rest: other)"),
    Option("pass_headers", "", _text,
           "Input Kafka headers copied onto the result and the dead letter, comma-separated (traceparent/tracestate always)"),
    Option("dlq_max_payload_bytes", 64 * 1024, _int_in(0, _MESSAGE_BYTES, "bytes"),
           "Most bytes of the original payload a dead letter carries (the rest: its size and sha256)"),
    Option("dlq_max_ratio", 0.5, _float_in(0, 1),
           "Dead-letter breaker: pause when more than this share of a partition's last EMBEDWORKER_DLQ_WINDOW messages are dead letters (0: off)"),
    Option("dlq_window", 1000, _int_in(1, 1_000_000, "messages"),
           "Dead-letter breaker: messages per partition the ratio is taken over (judged once that many were seen)"),
    Option("dlq_max_consecutive", 200, _int_in(0, 1_000_000, "messages"),
           "Dead-letter breaker: pause at more than this many dead letters in a row on a partition (0: off)"),
    Option("model", "all-MiniLM-L6-v2", _nonempty, "Model name or path (default: the bundled all-MiniLM-L6-v2)"),
    Option("device", "auto", _nonempty, "auto, cpu, cuda, cuda:N or mps"),
    Option("dimensions", 0, _int_in(0, 65_536),
           "Vector size: a local model's vectors are cut to it and normalized again (for models trained so: Matryoshka); "
           "an http server is asked for it (0: what the model gives)"),
    Option("embedder", "local", _choice("local", "http"),
           "local (sentence-transformers in this process) or http (an OpenAI-compatible /v1/embeddings server)"),
    Option("embeddings_url", "", _text, "Base URL of the embeddings server, e.g. http://tei:8080/v1 (embedder http)", secret=True),
    Option("embeddings_api_key", "", _text, "API key of the embeddings server (sent as a bearer token)", secret=True),
    # 65536: the largest dense vector Qdrant accepts.
    Option("embeddings_dimensions", 0, _int_in(0, 65_536), "The older name of EMBEDWORKER_DIMENSIONS, for the http embedder only"),
    Option("embeddings_max_batch", 32, _int_in(1, 4096, "inputs"), "Most inputs in one request to the embeddings server"),
    Option("embeddings_concurrency", 4, _int_in(1, 256, "requests"), "Requests to the embeddings server in flight at once"),
    Option("embeddings_encoding", "float", _choice("float", "base64"), "Vector encoding asked of the server"),
    Option("embeddings_retry_seconds", 10.0, _RETRY_SECONDS, "How long 429, 5xx and transport errors are retried per request"),
    Option("processes", 1, _int_in(1, 256),
           "Worker processes on this host, each a consumer-group member (needs a Qdrant server: the embedded and in-memory stores belong to one process)"),
    Option("torch_threads", 0, _int_in(0, 1024), "torch CPU threads (0: one per core)"),
    Option("metrics_port", 9108, _int_in(0, 65_535), "Port of /metrics (0: off)"),
    Option("metrics_host", "127.0.0.1", _nonempty, "Address /metrics binds to"),
    Option("batch_min_messages", 64, _BATCH_MESSAGES, "Batch size limit at low lag"),
    Option("batch_max_messages", 256, _BATCH_MESSAGES, "Batch size limit at high lag"),
    Option("batch_min_tokens", 4096, _BATCH_TOKENS, "Token budget of a batch at low lag"),
    Option("batch_max_tokens", 16384, _BATCH_TOKENS, "Token budget of a batch at high lag"),
    Option("batch_min_wait_ms", 5.0, _BATCH_WAIT_MS, "Longest wait for a batch to fill at low lag"),
    Option("batch_max_wait_ms", 250.0, _BATCH_WAIT_MS, "Longest wait for a batch to fill at high lag"),
    Option("lag_low", 100, _int_in(0, _LAG_RECORDS, "records"), "Lag (records) at or below which batching favours latency"),
    Option("lag_high", 5000, _int_in(1, _LAG_RECORDS, "records"), "Lag (records) at or above which batching favours throughput"),
    Option("max_in_flight_batches", 3, _int_in(1, 64, "batches"), "Batches processed concurrently (pipelining depth)"),
    Option("buffer_max_messages", 5000, _int_in(1, 10_000_000, "messages"), "Pause when this many messages are buffered"),
    Option("buffer_max_bytes", 64 * _MIB, _int_in(_MIB, 64 * _GIB, "bytes"), "Pause when this many bytes are buffered"),
    Option("memory_budget_bytes", 0, _int_in(64 * _MIB, 4 * _TIB, "bytes", off=True), "Pause when RSS reaches 90% of this"),
    Option("gc_young_threshold", 10_000, _int_in(700, 10_000_000, "allocations", off=True),
           "While running: the startup heap frozen out of Python's collector, young collections every this many allocations (0: the collector as it is)"),
    Option("fetch_max_records", 500, _int_in(1, 100_000, "records"), "Most records per fetch call"),
    Option("fetch_max_wait_ms", 10, _int_in(1, 10_000, "ms"), "Longest a fetch waits at the broker for data (a latency floor on brokers that hold it)"),
    Option("max_message_bytes", 1_000_000, _int_in(_KIB, _MESSAGE_BYTES, "bytes"), "Largest input message accepted"),
    Option("max_text_bytes", 100_000, _int_in(1, _MESSAGE_BYTES, "bytes"), "Largest text accepted (UTF-8 bytes)"),
    Option("commit_interval_ms", 500.0, _float_in(10, 60_000, "ms"), "How often finished offsets are committed (and lag is reported)"),
    Option("shutdown_timeout_seconds", 30.0, _float_in(1, 3600, "s"),
           "Drain deadline on SIGTERM (the worker needs it under 60 s: half of it, the revoke wait, must stay below the 30 s rebalance timeout)"),
    Option("tracing", True, _bool, "OpenTelemetry spans per batch when the otel extra is installed and a tracer provider is set"),
    Option("log_format", "text", _choice("text", "json"), "Log format"),
    Option("log_level", "INFO", _choice("DEBUG", "INFO", "WARNING", "ERROR"), "Log level"),
)

_BY_NAME = {option.name: option for option in OPTIONS}


@dataclass(frozen=True, kw_only=True)
class Settings:
    bootstrap_servers: str
    input_topic: str
    output_topic: str
    dlq_topic: str
    group_id: str
    isolation_level: str
    kafka_security_protocol: str
    kafka_sasl_mechanism: str
    kafka_sasl_username: str
    kafka_sasl_password: str
    kafka_ssl_cafile: str
    kafka_ssl_certfile: str
    kafka_ssl_keyfile: str
    redis_url: str
    cache_ttl_seconds: int
    cache_dtype: str
    qdrant_url: str
    qdrant_api_key: str
    qdrant_path: str
    qdrant_engine: str
    collection: str
    store_text: bool
    version_guard: bool
    payload_indexes: str
    sparse: str
    versioned_collections: bool
    quantization: str
    long_text: str
    chunk_overlap_tokens: int
    dlq_max_payload_bytes: int
    dlq_max_ratio: float
    dlq_window: int
    dlq_max_consecutive: int
    pass_headers: str
    input_format: str
    id_from: str
    text_from: str
    metadata_from: str
    version_from: str
    tenant_from: str
    tenancy: str
    cache_scope: str
    fair_batching: bool
    tenant_metrics_top: int
    tenant_tokens_per_second: int
    collection_template: str
    max_tenant_collections: int
    tenant_quotas_file: str
    embed_retry_seconds: float
    model: str
    device: str
    dimensions: int
    embedder: str
    embeddings_url: str
    embeddings_api_key: str
    embeddings_dimensions: int
    embeddings_max_batch: int
    embeddings_concurrency: int
    embeddings_encoding: str
    embeddings_retry_seconds: float
    metrics_port: int
    metrics_host: str
    batch_min_messages: int
    batch_max_messages: int
    batch_min_tokens: int
    batch_max_tokens: int
    batch_min_wait_ms: float
    batch_max_wait_ms: float
    lag_low: int
    lag_high: int
    max_in_flight_batches: int
    buffer_max_messages: int
    buffer_max_bytes: int
    memory_budget_bytes: int
    gc_young_threshold: int
    fetch_max_records: int
    torch_threads: int
    processes: int
    fetch_max_wait_ms: int
    max_message_bytes: int
    max_text_bytes: int
    commit_interval_ms: float
    shutdown_timeout_seconds: float
    tracing: bool
    log_format: str
    log_level: str

    def __repr__(self) -> str:
        shown = []
        for f in fields(self):
            value = getattr(self, f.name)
            if _BY_NAME[f.name].secret and value:
                value = "***"
            shown.append(f"{f.name}={value!r}")
        return f"Settings({', '.join(shown)})"

    __str__ = __repr__

    def replace(self, **changes: Any) -> "Settings":
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return Settings(**values)


def _check(settings: Settings) -> None:
    from schemas.mapping import parse_mapping
    from schemas.tenancy import parse_tenant_from

    try:
        parse_mapping(
            input_format=settings.input_format, id_from=settings.id_from, text_from=settings.text_from,
            metadata_from=settings.metadata_from, version_from=settings.version_from,
        )
    except ValueError as exc:
        setting = str(exc).split(":", 1)[0].upper() if ":" in str(exc) else "INPUT_FORMAT"
        raise ConfigError(f"EMBEDWORKER_{setting}", str(exc)) from None
    if settings.tenant_from:
        try:
            parse_tenant_from(settings.tenant_from)
        except ValueError as exc:
            raise ConfigError("EMBEDWORKER_TENANT_FROM", str(exc)) from None
        if not settings.tenant_from.startswith("header:") and (
            settings.input_format == "debezium" or (settings.id_from or "id").startswith("key")
        ):
            # A field is read from the record's value, which a delete's row or a tombstone does not carry the same way.
            raise ConfigError("EMBEDWORKER_TENANT_FROM", "with Debezium events or ids from the key, the tenant must come "
                              "from a header (header:<name>)")
    if "{tenant}" not in settings.collection_template:
        raise ConfigError("EMBEDWORKER_COLLECTION_TEMPLATE", "must contain {tenant}")
    if settings.tenancy == "collection" and not settings.tenant_from:
        raise ConfigError("EMBEDWORKER_TENANCY", "collection needs EMBEDWORKER_TENANT_FROM")
    if settings.tenant_quotas_file:
        from streams.quotas import load_quotas

        try:
            load_quotas(settings.tenant_quotas_file)
        except ValueError as exc:
            raise ConfigError("EMBEDWORKER_TENANT_QUOTAS_FILE", str(exc)) from None
    if settings.batch_min_messages > settings.batch_max_messages:
        raise ConfigError("EMBEDWORKER_BATCH_MIN_MESSAGES", "is above EMBEDWORKER_BATCH_MAX_MESSAGES")
    if settings.batch_min_tokens > settings.batch_max_tokens:
        raise ConfigError("EMBEDWORKER_BATCH_MIN_TOKENS", "is above EMBEDWORKER_BATCH_MAX_TOKENS")
    if settings.batch_min_wait_ms > settings.batch_max_wait_ms:
        raise ConfigError("EMBEDWORKER_BATCH_MIN_WAIT_MS", "is above EMBEDWORKER_BATCH_MAX_WAIT_MS")
    if settings.lag_low >= settings.lag_high:
        raise ConfigError("EMBEDWORKER_LAG_LOW", "must be below EMBEDWORKER_LAG_HIGH")
    if settings.qdrant_url and settings.qdrant_path:
        raise ConfigError("EMBEDWORKER_QDRANT_PATH", "give EMBEDWORKER_QDRANT_URL or EMBEDWORKER_QDRANT_PATH, not both")
    if settings.qdrant_url and not settings.qdrant_url.startswith(("http://", "https://")):
        raise ConfigError("EMBEDWORKER_QDRANT_URL", "must start with http:// or https://")
    if settings.redis_url and not settings.redis_url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError("EMBEDWORKER_REDIS_URL", "must start with redis://, rediss:// or unix://")
    if settings.kafka_security_protocol.startswith("SASL") and not settings.kafka_sasl_username:
        raise ConfigError("EMBEDWORKER_KAFKA_SASL_USERNAME", "is required with a SASL security protocol")
    if settings.embedder == "http" and not settings.embeddings_url.startswith(("http://", "https://")):
        raise ConfigError("EMBEDWORKER_EMBEDDINGS_URL", "an http:// or https:// URL is required with EMBEDWORKER_EMBEDDER=http")
    if len({settings.input_topic, settings.output_topic, settings.dlq_topic}) < 3:
        raise ConfigError("EMBEDWORKER_OUTPUT_TOPIC", "input, output and dead-letter topics must differ")


def load_settings(
    overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Defaults, then `EMBEDWORKER_*` variables, then `overrides` (already-typed or text)."""
    environ = os.environ if environ is None else environ
    overrides = overrides or {}
    values: dict[str, Any] = {}
    for option in OPTIONS:
        raw: Any = option.default
        source = None
        if option.env in environ:
            raw, source = environ[option.env], option.env
        if overrides.get(option.name) is not None:
            raw, source = overrides[option.name], option.flag
        try:
            if source is not None and isinstance(raw, str):
                raw = option.parse(raw)
            elif source is not None and isinstance(option.parse, Range):
                raw = option.parse.check(raw)  # a typed override (code, not a user) gets the same bounds
        except ValueError as exc:
            shown = "***" if option.secret else repr(raw)
            raise ConfigError(option.env, f"{shown}: {exc}") from None
        values[option.name] = raw
    settings = Settings(**values)
    _check(settings)
    return settings


def add_arguments(parser: argparse.ArgumentParser, names: set[str] | None = None) -> None:
    """One flag per option (all of them, or `names`), defaulting to None so env vars apply."""
    for option in OPTIONS:
        if names is not None and option.name not in names:
            continue
        default = "(secret)" if option.secret else option.default
        parser.add_argument(
            option.flag,
            dest=option.name,
            default=None,
            metavar=option.name.split("_")[-1].upper(),
            # argparse %-formats help: "90% of this" would break --help.
            help=f"{option.doc} [env {option.env}, default {default!r}]".replace("%", "%%"),
        )


def markdown_table() -> str:
    rows = ["| variable | flag | default | meaning |", "|---|---|---|---|"]
    for option in OPTIONS:
        default = "" if option.default == "" else f"`{option.default}`"
        rows.append(f"| `{option.env}` | `{option.flag}` | {default} | {option.doc} |")
    return "\n".join(rows)
