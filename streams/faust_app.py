"""A Faust runtime for teams already on Faust: the same pipeline, run by a Faust worker.

What it does: one agent on `EMBEDWORKER_INPUT_TOPIC` micro-batches the stream with
`stream.take_events(batch_max_messages, within=batch_max_wait_ms)` (the event-yielding
twin of `stream.take`: the same buffer, but each value comes with its message, whose
topic, partition and offset a dead letter must name). Every value is decoded with
`schemas.decode_input`; bad input becomes one dead letter, with the main runtime's
envelope (`encode_dead_letter`). Valid events go through the shared
`processors.pipeline.Pipeline` (Redis content-hash cache, embedding, Qdrant writes: the
very code the main runtime uses; tombstones and `"op": "delete"` delete, long texts are
chunked), then one result per event goes to `EMBEDWORKER_OUTPUT_TOPIC` (key: the event
id), and a dead letter per text the model could not embed. Results and dead letters go
through the main runtime's `streams.steps.publish.Publisher` (acknowledgements awaited,
retriable errors retried with backoff, a refused dead letter sent without its payload)
before the batch's events are acknowledged to Faust, and Faust commits only acknowledged
offsets: at-least-once, as in the main runtime. One batch at a time keeps every id's
writes and results in offset order.

Safety net: `take_events` acknowledges its buffered events in a `finally`, so a batch
abandoned by an exception or a cancellation would otherwise be committed without
results. Each batch therefore holds one extra reference on its messages and releases it
only once the batch's results are acknowledged: an abandoned batch stays uncommitted and
is replayed by the next owner. An unexpected error stops the worker (non-zero exit), like
`WorkerError` in the main runtime.

Run it:

    embedworker faust worker                      # settings from EMBEDWORKER_* variables
    faust -A streams.faust_app worker --without-web -l info

Choose it when your team already operates Faust workers (deployment, supervision,
Faust's own CLI and sensors) and the throughput of one batch at a time per worker is
enough. Choose the main runtime (`embedworker run`) otherwise; this one does NOT have:

- pipelining: one batch at a time per worker (agent concurrency 1, which keeps the
  upserts in offset order); the main runtime overlaps fetching, cache lookups,
  embedding and upserts of up to `max_in_flight_batches` batches.
- adaptive batching: a fixed message count (`batch_max_messages`) and wait
  (`batch_max_wait_ms`); no token budget (`batch_*_tokens`), no lag-driven switch
  between the min and max limits (`batch_min_*`, `lag_low`, `lag_high` are ignored).
- backpressure beyond a message count: Faust bounds its stream buffer
  (`stream_buffer_maxsize` = `buffer_max_messages`) but there is no pause on buffered
  bytes (`buffer_max_bytes`), memory (`memory_budget_bytes`) or an unhealthy sink.
- embedworker's metrics: no `/metrics` (`metrics_port` is ignored): no lag (records or
  seconds), cache hit, embed/upsert time, batch size, backpressure or end-to-end latency
  metrics, and no `RunStats`. Logs only; Faust's web UI is off (`--without-web`). An
  operator can add one of Faust's own sensors (e.g. `faust.sensors.prometheus`) for
  per-partition offsets.
- a drain deadline (`shutdown_timeout_seconds` is ignored): on SIGTERM and on a
  rebalance Faust waits for the batch in progress and the events buffered for it
  (`stream_wait_empty`) however long that takes; a batch slower than
  `broker_rebalance_timeout` (10 s here) during a rebalance can get this member
  evicted (its batch is then replayed, never lost).
- Tables, `exactly_once`: not used (see FINDINGS: they misbehave on the Tansu broker).

Also: Faust uses its own partition assignor, so a Faust worker and main-runtime workers
must not share a consumer group at the same time; they can take turns (the committed
offsets are ordinary group offsets). The app id is `EMBEDWORKER_GROUP_ID` (Faust's group
id), and Faust keeps a `<group id>-data` directory under the working directory
(`--datadir` moves it). Offsets are committed every `commit_interval_ms`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from typing import Any, Sequence

import faust
from mode import CrashingSupervisor

from processors.cache import VectorCache
from processors.embedder import Embedder
from processors.pipeline import Outcome, Pipeline
from processors.sink import StoreWriter
from schemas import REPLAY_COUNT_HEADER, InvalidEvent, Limits, SourcePosition, copied_headers, passed_header_names
from schemas.mapping import decode_record
from streams.assembly import build_mapping
from streams.config import ConfigError, Settings, load_settings
from streams.backends.kafka import security_kwargs
from streams.steps.publish import OutRecord, Publisher, dead_letter_record, split_outcomes

log = logging.getLogger(__name__)

__all__ = ["create_app", "main"]

AGENT_NAME = "embedworker.embed"

# The group settings this broker needs (FINDINGS: joins in ~5 s instead of 30-110 s).
BROKER_SESSION_TIMEOUT = 10.0
BROKER_HEARTBEAT_INTERVAL = 3.0
BROKER_REBALANCE_TIMEOUT = 10.0


def _credentials(settings: Settings) -> Any:
    protocol = settings.kafka_security_protocol
    if protocol == "PLAINTEXT":
        return None
    ssl_context = security_kwargs(settings).get("ssl_context")
    if protocol == "SSL":
        return faust.SSLCredentials(ssl_context)
    return faust.SASLCredentials(
        username=settings.kafka_sasl_username,
        password=settings.kafka_sasl_password,
        ssl_context=ssl_context,  # SASL_SSL with a context, SASL_PLAINTEXT without
        mechanism=settings.kafka_sasl_mechanism,
    )


class _Runtime:
    """What the agent shares across batches: the pipeline and where results go.

    Parts not given to `create_app` are built from the settings on first start (the
    model loads in a thread, off the event loop) and closed on shutdown.
    """

    def __init__(
        self,
        app: faust.App,
        settings: Settings,
        *,
        embedder: Embedder | None,
        sink: StoreWriter | None,
        cache: VectorCache | None,
    ) -> None:
        self.settings = settings
        self.limits = Limits(max_message_bytes=settings.max_message_bytes, max_text_bytes=settings.max_text_bytes)
        self.output = app.topic(settings.output_topic, key_serializer="raw", value_serializer="raw")
        self.dlq = app.topic(settings.dlq_topic, key_serializer="raw", value_serializer="raw")
        self.embedder = embedder
        self.sink = sink
        self.cache = cache
        self.pipeline: Pipeline | None = None
        self._parts = contextlib.AsyncExitStack()  # what `assemble` built, closed on shutdown
        self._start_lock = asyncio.Lock()
        # The main runtime's publishing: every acknowledgement awaited, retriable errors retried,
        # a refused dead letter sent without its payload, anything else a stop.
        self.publisher = Publisher(send=self._send)
        self._pass_headers = passed_header_names(settings.pass_headers, REPLAY_COUNT_HEADER)
        self.mapping = build_mapping(settings)

    async def start(self) -> Pipeline:
        async with self._start_lock:
            if self.pipeline is not None:
                return self.pipeline
            from streams.assembly import assemble

            s = self.settings
            parts = await self._parts.enter_async_context(
                assemble(s, embedder=self.embedder, sink=self.sink, cache=self.cache)
            )
            self.embedder, self.sink, self.cache = parts.embedder, parts.sink, parts.cache
            pipeline = parts.pipeline()
            await pipeline.start()
            self.pipeline = pipeline
            log.info(
                "faust runtime ready: %s -> %s (dead letters: %s), collection %s",
                s.input_topic, s.output_topic, s.dlq_topic, self.sink.collection,
            )
            return pipeline

    async def close(self) -> None:
        pipeline, self.pipeline = self.pipeline, None
        if pipeline is not None:
            await pipeline.close()
        await self._parts.aclose()

    async def handle(self, events: Sequence[Any]) -> None:
        """One batch: decode, process, publish; its messages stay held until acknowledged."""
        messages = [event.message for event in events]
        for message in messages:
            message.incref()  # released below only when every result is acknowledged
        pipeline = self.pipeline or await self.start()

        valid: list[tuple[Any, Any]] = []
        failures: list[tuple[Any, str, str]] = []
        for message in messages:
            try:
                valid.append((message, decode_record(message.value, message.key, self._headers(message), self.mapping, self.limits).event))
            except InvalidEvent as exc:
                failures.append((message, exc.kind, exc.message))

        outcomes: list[Outcome] = await pipeline.process([e for _, e in valid]) if valid else []
        results, failed = split_outcomes([(message, o) for (message, _), o in zip(valid, outcomes)])
        failures.extend(failed)
        out = [
            OutRecord(self.settings.output_topic, o.event.id.encode("utf-8"), o.result.encode(), headers=self._copied(m))  # type: ignore[union-attr]
            for m, o in results
        ]
        for message, kind, text in failures:
            source = SourcePosition(topic=message.topic, partition=message.partition, offset=message.offset)
            out.append(dead_letter_record(
                topic=self.settings.dlq_topic, source=source, key=message.key, payload=message.value, kind=kind,
                message=text, max_payload_bytes=self.settings.dlq_max_payload_bytes, headers=self._copied(message),
            ))
        await self.publisher.publish(out)

        for message in messages:
            message.decref()  # take_events' own ack now makes them committable
        log.debug("batch of %d: %d results, %d dead letters", len(messages), len(results), len(failures))

    @staticmethod
    def _headers(message: Any) -> Any:
        headers = message.headers or ()
        return list(headers.items()) if isinstance(headers, dict) else headers

    def _copied(self, message: Any) -> tuple[tuple[str, bytes], ...]:
        """The input's headers that travel onto its result or dead letter: the same rule as the main runtime."""
        return copied_headers(self._headers(message), self._pass_headers, replay_header=REPLAY_COUNT_HEADER)[0]

    def _send(self, topic: str, key: bytes | None, value: bytes, headers: Any = ()) -> Any:
        # force: publish now, never as a Faust "attachment" held until commit.
        target = self.output if topic == self.settings.output_topic else self.dlq
        return target.send(key=key, value=value, headers=list(headers) or None, force=True)


class _EmbedApp(faust.App):
    """faust.App that closes the runtime after its agents have stopped."""

    embed_runtime: _Runtime | None = None

    async def on_shutdown(self) -> None:
        await super().on_shutdown()
        if self.embed_runtime is not None:
            await self.embed_runtime.close()


def create_app(
    settings: Settings,
    *,
    embedder: Embedder | None = None,
    sink: StoreWriter | None = None,
    cache: VectorCache | None = None,
) -> faust.App:
    """A Faust app running the embedding pipeline (see the module docstring).

    `embedder`, `sink`, `cache`: None builds them from `settings` when the worker starts
    (no Redis URL: no cache); given ones are used as they are and not closed.
    """
    s = settings
    app = _EmbedApp(
        s.group_id,
        broker=[f"kafka://{server.strip()}" for server in s.bootstrap_servers.split(",") if server.strip()],
        broker_credentials=_credentials(s),
        broker_client_id="embedworker",
        broker_session_timeout=BROKER_SESSION_TIMEOUT,
        broker_heartbeat_interval=BROKER_HEARTBEAT_INTERVAL,
        broker_rebalance_timeout=BROKER_REBALANCE_TIMEOUT,
        broker_commit_interval=s.commit_interval_ms / 1000,
        broker_max_poll_records=s.fetch_max_records,
        consumer_max_fetch_size=max(1_048_576, s.max_message_bytes + 1024),
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        producer_linger=0.005,
        # A dead letter carries the original payload plus an envelope.
        producer_max_request_size=max(1_048_576, 2 * s.max_message_bytes + 65_536),
        key_serializer="raw",
        value_serializer="raw",
        processing_guarantee="at_least_once",
        stream_buffer_maxsize=s.buffer_max_messages,
        stream_wait_empty=True,
        topic_disable_leader=True,  # no leader topic: no Tables, no leader-only tasks
        web_enabled=False,
        autodiscover=False,
    )
    runtime = _Runtime(app, s, embedder=embedder, sink=sink, cache=cache)
    app.embed_runtime = runtime
    source = app.topic(s.input_topic, key_serializer="raw", value_serializer="raw")
    within = s.batch_max_wait_ms / 1000

    async def embed(stream: faust.StreamT) -> None:
        await runtime.start()
        async for events in stream.take_events(s.batch_max_messages, within=within):
            await runtime.handle(events)

    # Concurrency 1: upserts stay in offset order. An unexpected error stops the worker
    # (its batch is neither acknowledged nor committed) instead of restarting the agent.
    app.agent(source, name=AGENT_NAME, concurrency=1, supervisor_strategy=CrashingSupervisor)(embed)
    return app


_app: faust.App | None = None


def get_app() -> faust.App:
    """The app of `faust -A streams.faust_app`: settings from EMBEDWORKER_* variables."""
    global _app
    if _app is None:
        _app = create_app(load_settings())
    return _app


def __getattr__(name: str) -> Any:
    # Module-level `app`, built on first access: importing this module loads no settings
    # and no model (the model loads when the worker starts).
    if name == "app":
        return get_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_LOGLEVELS = {"DEBUG": "debug", "INFO": "info", "WARNING": "warn", "ERROR": "error"}


def main(argv: Sequence[str] | None = None) -> int:
    """`embedworker faust [worker] [faust options]`: the Faust CLI on this app.

    `worker` gets `--without-web` (unless `--with-web` is given) and the log level of
    `EMBEDWORKER_LOG_LEVEL` (unless `-l/--loglevel` is given). Other Faust subcommands
    (`agents`, `send`, ...) pass through unchanged. Returns the exit status.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        settings = load_settings()  # a bad setting: one line, exit 2, before Faust starts
    except ConfigError as exc:
        print(f"embedworker: {exc}", file=sys.stderr)
        return 2
    if not args:
        args = ["worker"]
    if args[0] == "worker":
        options = args[1:]
        if "--with-web" not in options and "--without-web" not in options:
            options.insert(0, "--without-web")
        if not any(o in ("-l", "--loglevel") or o.startswith(("--loglevel=", "-l")) for o in options):
            options[:0] = ["--loglevel", _LOGLEVELS[settings.log_level]]
        args = ["worker", *options]

    from faust.cli.faust import cli

    try:
        cli.main(args=["-A", __name__ if __name__ != "__main__" else "streams.faust_app", *args], prog_name="embedworker faust")
    except SystemExit as exc:
        code = exc.code
        if code is None:
            return 0
        if isinstance(code, int):
            return code
        print(code, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
