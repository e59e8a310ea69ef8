"""`embedworker`: the command line.

User mistakes (bad settings, unreachable services, a wrong collection) end with one line
on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from typing import Any, Callable, Sequence

import orjson

from streams.config import ConfigError, Settings, add_arguments, load_settings

log = logging.getLogger("embedworker")


class UserError(Exception):
    """A mistake or an environment problem to report in one line."""


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


def setup_logging(settings: Settings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if settings.log_format == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level)
    for noisy in ("aiokafka", "httpx", "sentence_transformers", "transformers", "faust", "mode"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(settings.log_level)))


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings({k: v for k, v in vars(args).items() if not k.startswith("cmd_")})


# ---- run ----------------------------------------------------------------------------------


async def _run_worker(settings: Settings) -> int:
    from processors.sink import SinkConfigError
    from streams.factory import build_cache, build_embedder, build_sink
    from streams.metrics import Metrics
    from streams.runtime import Worker, WorkerError

    metrics = Metrics()
    if settings.metrics_port:
        try:
            metrics.serve(port=settings.metrics_port, host=settings.metrics_host)
        except OSError as exc:
            raise UserError(f"cannot serve metrics on {settings.metrics_host}:{settings.metrics_port}: {exc.strerror}") from None
    loop = asyncio.get_running_loop()
    embedder = await loop.run_in_executor(None, build_embedder, settings)  # off the loop: seconds of work
    if not settings.qdrant_url and not settings.qdrant_path:
        log.warning("no EMBEDWORKER_QDRANT_URL or EMBEDWORKER_QDRANT_PATH: vectors are kept in memory only")
    sink, cache = build_sink(settings), build_cache(settings, metrics)
    worker = Worker(settings, embedder=embedder, sink=sink, cache=cache, metrics=metrics)

    signals = {"count": 0}

    def on_signal() -> None:
        signals["count"] += 1
        if signals["count"] == 1:
            log.info("stopping: draining in-flight batches (signal again to exit at once)")
            worker.request_stop()
        else:
            os._exit(130)  # replay covers whatever was not committed

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    try:
        await worker.run()
    except (SinkConfigError, WorkerError) as exc:
        raise UserError(str(exc)) from None
    finally:
        if cache is not None:
            await cache.close()
        await sink.close()
    log.info("stopped cleanly: %d processed, %d dead letters", worker.stats.processed, worker.stats.dead_letters)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    settings = _settings(args)
    setup_logging(settings)
    return asyncio.run(_run_worker(settings))


def cmd_demo(args: argparse.Namespace) -> int:
    from streams.demo import run_demo

    settings = _settings(args)
    setup_logging(settings.replace(log_level="WARNING") if settings.log_level == "INFO" else settings)
    return asyncio.run(run_demo(settings, count=args.cmd_count))


def cmd_faust(args: argparse.Namespace) -> int:
    from streams.faust_app import main as faust_main

    return faust_main(args.cmd_faust_args)


# ---- entry point --------------------------------------------------------------------------

COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int], str]] = {
    "run": (cmd_run, "Run the worker: consume, embed, upsert, publish results, commit."),
    "demo": (cmd_demo, "Start local services, run the worker on a sample corpus, search it, stop."),
    "faust": (cmd_faust, "Run the pipeline as a Faust app: `embedworker faust worker [faust options]` (settings from EMBEDWORKER_* variables)."),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
        if name == "demo":
            command.add_argument("--count", dest="cmd_count", type=int, default=1200, help="Valid sample events to produce (default 1200)")
        add_arguments(command)
    return parser


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
        print(f"embedworker: {exc}", file=sys.stderr)
        return 2
    except UserError as exc:
        print(f"embedworker: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
