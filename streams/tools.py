"""Operator commands behind the CLI: `produce`, `search`, `status` and `reembed`.

Each function takes `Settings` plus its own arguments and raises `UserError` (one line,
no traceback) for anything the user can fix: a missing file, a bad record, an
unreachable broker or store, a missing collection. Network waits are bounded.

Kafka notes (see FINDINGS): the local broker's `end_offsets` (ListOffsets latest)
under-reports, so log-end offsets come from a fetch response's high watermark
(`consumer.highwater`), read by a group-less consumer; committed offsets come from a
consumer's `committed()`, never from the admin client.
"""

from __future__ import annotations

import asyncio
import copy
import csv
import io
import os
import re
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, AsyncIterator, Iterable, Iterator, Sequence

import orjson

from streams.config import Settings

DEFAULT_TIMEOUT_SECONDS = 10.0
FORMATS = ("lines", "jsonl", "csv")


class UserError(Exception):
    """A mistake or an environment problem to report in one line."""


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split())[:300]


def _progress(total: int | None, desc: str, unit: str):
    from tqdm import tqdm

    # disable=None: a bar only when stderr is a terminal (no bar in logs and pipes).
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=None, dynamic_ncols=True)


# ---- Kafka helpers ------------------------------------------------------------------------


async def _start_client(client: Any, settings: Settings, timeout: float) -> None:
    """Start an aiokafka client within `timeout` seconds or raise `UserError`."""
    from aiokafka.errors import KafkaError

    try:
        await asyncio.wait_for(client.start(), timeout)
    except (KafkaError, OSError, asyncio.TimeoutError) as exc:
        await _stop_quietly(client)
        reason = f"no answer within {timeout:g}s" if isinstance(exc, asyncio.TimeoutError) else _one_line(exc)
        raise UserError(f"cannot reach Kafka at {settings.bootstrap_servers}: {reason}") from None


async def _stop_quietly(client: Any) -> None:
    try:
        await asyncio.wait_for(client.stop(), 10)
    except Exception:
        pass


async def _topic_partitions(consumer: Any, topic: str, timeout: float) -> list[Any]:
    """The topic's partitions, from a full metadata request (which never auto-creates it)."""
    from aiokafka import TopicPartition
    from aiokafka.errors import KafkaError

    try:
        topics = await asyncio.wait_for(consumer.topics(), timeout)
    except (KafkaError, asyncio.TimeoutError) as exc:
        raise UserError(f"cannot read the topic list: {_one_line(exc) if str(exc) else 'no answer within ' + format(timeout, 'g') + 's'}") from None
    partitions = consumer.partitions_for_topic(topic) if topic in topics else None
    if not partitions:
        raise UserError(f"topic {topic!r} does not exist")
    return [TopicPartition(topic, p) for p in sorted(partitions)]


async def _high_watermarks(reader: Any, tps: Sequence[Any], timeout: float) -> tuple[dict[Any, int], dict[Any, int]]:
    """(log start, high watermark) per partition, from fetch responses of a group-less reader.

    The reader is assigned `tps` and seeks to `end_offsets` (exact on Kafka, a lower bound
    on the local broker, never below the log start), so one fetch returns at most the
    last batch, and its response carries the true high watermark. `auto_offset_reset`
    covers a broker whose `end_offsets` would over-report.
    """
    from aiokafka.errors import KafkaError

    reader.assign(list(tps))
    deadline = time.monotonic() + timeout
    try:
        beginning = await asyncio.wait_for(reader.beginning_offsets(list(tps)), timeout)
        ends = await asyncio.wait_for(reader.end_offsets(list(tps)), timeout)
        for tp in tps:
            reader.seek(tp, max(beginning.get(tp, 0), ends.get(tp, 0)))
        while any(reader.highwater(tp) is None for tp in tps):
            left = deadline - time.monotonic()
            if left <= 0:
                missing = ", ".join(str(tp.partition) for tp in tps if reader.highwater(tp) is None)
                raise UserError(f"no high watermark for partition(s) {missing} of {tps[0].topic!r} after {timeout:g}s")
            await reader.getmany(timeout_ms=int(min(0.5, left) * 1000) + 1)
    except (KafkaError, asyncio.TimeoutError) as exc:
        raise UserError(f"cannot read the offsets of {tps[0].topic!r}: {_one_line(exc) if str(exc) else type(exc).__name__}") from None
    return dict(beginning), {tp: int(reader.highwater(tp)) for tp in tps}


def _reader(settings: Settings, timeout: float, **overrides: Any) -> Any:
    """A group-less consumer (assigns, never joins or commits)."""
    from streams.kafka import make_consumer

    kwargs: dict[str, Any] = dict(
        group_id=None, fetch_max_wait_ms=100, request_timeout_ms=int(timeout * 1000) + 5000,
        client_id="embedworker-tools",
    )
    kwargs.update(overrides)
    return make_consumer(settings, **kwargs)


# ---- produce ------------------------------------------------------------------------------


def _open_input(source: str) -> tuple[IO[str], str]:
    """A text stream of FILE (UTF-8, a BOM is ignored) or of stdin for `-`."""
    if source == "-":
        raw = getattr(sys.stdin, "buffer", None)
        if raw is None:  # already text (tests, embedding)
            return sys.stdin, "stdin"
        return io.TextIOWrapper(raw, encoding="utf-8-sig", newline=""), "stdin"
    try:
        return open(source, encoding="utf-8-sig", newline=""), source
    except OSError as exc:
        raise UserError(f"cannot read {source}: {exc.strerror or exc}") from None


def _generated_id(prefix: str | None, name: str, line: int) -> str:
    return f"{Path(name).name}:{line}" if prefix is None else f"{prefix}{line}"


def _given_id(prefix: str | None, value: Any, where: str, id_field: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise UserError(f"{where}: field {id_field!r} must be a string or an integer, got {type(value).__name__}")
    return f"{prefix or ''}{value}"


def _record_event(record: dict[str, Any], *, where: str, line: int, name: str, id_field: str, text_field: str, id_prefix: str | None):
    from schemas import InputEvent

    if text_field not in record:
        fields = ", ".join(repr(k) for k in list(record)[:10])
        raise UserError(f"{where}: no field {text_field!r} (fields: {fields}; see --text-field)")
    text = record[text_field]
    if not isinstance(text, str):
        raise UserError(f"{where}: field {text_field!r} must be a string, got {type(text).__name__}")
    if id_field in record and record[id_field] not in (None, ""):
        event_id = _given_id(id_prefix, record[id_field], where, id_field)
    else:
        event_id = _generated_id(id_prefix, name, line)
    metadata: dict[str, Any] = {}
    if isinstance(record.get("metadata"), dict) and "metadata" not in (id_field, text_field):
        metadata.update(record["metadata"])
    for key, value in record.items():
        if key in (id_field, text_field) or (key == "metadata" and isinstance(value, dict)):
            continue
        metadata[key] = value
    return InputEvent(id=event_id, text=text, metadata=metadata)


def _event_or_error(record: dict[str, Any], **kwargs: Any) -> Any:
    try:
        return _record_event(record, **kwargs)
    except UserError as exc:
        return exc


def _iter_records(stream: IO[str], fmt: str, name: str, *, id_field: str, text_field: str, id_prefix: str | None) -> Iterator[tuple[str, Any]]:
    """(where, InputEvent or UserError) for every record, in order; file-level problems raise."""
    from schemas import InputEvent

    try:
        if fmt == "lines":
            for number, line in enumerate(stream, start=1):
                text = line.rstrip("\r\n")
                if text.strip():
                    yield f"{name}:{number}", InputEvent(id=_generated_id(id_prefix, name, number), text=text)
        elif fmt == "jsonl":
            for number, line in enumerate(stream, start=1):
                if not line.strip():
                    continue
                where = f"{name}:{number}"
                try:
                    record = orjson.loads(line)
                except orjson.JSONDecodeError as exc:
                    yield where, UserError(f"{where}: not valid JSON ({_one_line(exc)})")
                    continue
                if not isinstance(record, dict):
                    yield where, UserError(f"{where}: expected a JSON object, got {type(record).__name__}")
                    continue
                yield where, _event_or_error(record, where=where, line=number, name=name, id_field=id_field, text_field=text_field, id_prefix=id_prefix)
        elif fmt == "csv":
            reader = csv.DictReader(stream)
            header = reader.fieldnames
            if not header:
                return
            if text_field not in header:
                raise UserError(f"{name}: the CSV header has no column {text_field!r} (columns: {', '.join(header)}; see --text-field)")
            for row in reader:
                where = f"{name}:{reader.line_num}"
                if None in row:
                    yield where, UserError(f"{where}: more cells than header columns")
                    continue
                record = {k: v for k, v in row.items() if v is not None}
                if not any((v or "").strip() for v in record.values()):
                    continue  # blank row
                yield where, _event_or_error(record, where=where, line=reader.line_num, name=name, id_field=id_field, text_field=text_field, id_prefix=id_prefix)
        else:
            raise UserError(f"unknown format {fmt!r} (expected one of {', '.join(FORMATS)})")
    except UnicodeDecodeError as exc:
        raise UserError(f"{name}: not valid UTF-8 (byte {exc.start})") from None
    except csv.Error as exc:
        raise UserError(f"{name}: bad CSV: {_one_line(exc)}") from None


def read_events(
    source: str,
    fmt: str,
    settings: Settings,
    *,
    id_field: str = "id",
    text_field: str = "text",
    id_prefix: str | None = None,
    skip_invalid: bool = False,
) -> tuple[list[Any], int]:
    """Every event of FILE (or `-`), each checked as the worker will decode it.

    Returns (events, skipped). An invalid record stops with `UserError` naming its line,
    unless `skip_invalid`, which skips it with a warning on stderr.
    """
    from schemas import InvalidEvent, Limits, decode_input, encode_input

    if fmt not in FORMATS:
        raise UserError(f"unknown format {fmt!r} (expected one of {', '.join(FORMATS)})")
    limits = Limits(max_message_bytes=settings.max_message_bytes, max_text_bytes=settings.max_text_bytes)
    stream, name = _open_input(source)
    events: list[Any] = []
    skipped = 0
    try:
        for where, event in _iter_records(stream, fmt, name, id_field=id_field, text_field=text_field, id_prefix=id_prefix):
            if isinstance(event, UserError):
                if not skip_invalid:
                    raise event
                print(f"embedworker: skipped {event}", file=sys.stderr)
                skipped += 1
                continue
            try:
                events.append(decode_input(encode_input(event), limits))
            except InvalidEvent as exc:
                if not skip_invalid:
                    raise UserError(f"{where}: {exc.message}") from None
                print(f"embedworker: skipped {where}: {exc.message}", file=sys.stderr)
                skipped += 1
    finally:
        if stream is not sys.stdin:
            stream.close()
    return events, skipped


async def produce(settings: Settings, events: Sequence[Any], *, topic: str | None = None, timeout: float = DEFAULT_TIMEOUT_SECONDS) -> int:
    """Send input events (keyed by id) to the input topic; returns how many were acknowledged."""
    from aiokafka.errors import KafkaError

    from schemas import encode_input
    from streams.kafka import make_producer

    topic = topic or settings.input_topic
    producer = make_producer(settings, request_timeout_ms=int(timeout * 1000), client_id="embedworker-produce")
    await _start_client(producer, settings, timeout)
    acked = 0
    try:
        with _progress(len(events), f"producing to {topic}", "event") as bar:
            pending: list[Any] = []

            async def settle() -> None:
                nonlocal acked
                for future in pending:
                    await future
                    acked += 1
                bar.update(len(pending))
                pending.clear()

            for event in events:
                pending.append(await producer.send(topic, value=encode_input(event), key=event.id.encode("utf-8")))
                if len(pending) >= 1000:
                    await settle()
            await settle()
    except KafkaError as exc:
        raise UserError(f"sending to {topic} failed after {acked} of {len(events)} events: {type(exc).__name__}: {_one_line(exc)}") from None
    finally:
        await _stop_quietly(producer)
    return acked


# ---- Qdrant helpers -----------------------------------------------------------------------


def _open_sink(settings: Settings, collection: str | None = None, *, must_exist_path: bool = True) -> Any:
    """The sink on the configured server or embedded path (either engine); never the in-memory store."""
    from processors.sink import SinkConfigError
    from streams.factory import build_sink

    if not settings.qdrant_url and not settings.qdrant_path:
        raise UserError("no Qdrant configured: set EMBEDWORKER_QDRANT_URL or EMBEDWORKER_QDRANT_PATH (--qdrant-url, --qdrant-path)")
    if settings.qdrant_path and must_exist_path and not os.path.isdir(settings.qdrant_path):
        raise UserError(f"no Qdrant store at {settings.qdrant_path}")
    try:
        return build_sink(settings, collection)
    except SinkConfigError as exc:
        raise UserError(str(exc)) from None
    except RuntimeError as exc:
        if "already accessed" in str(exc):
            raise UserError(
                f"the Qdrant store {settings.qdrant_path} is open in another process (one process per path: "
                "stop the worker first, or use a Qdrant server)"
            ) from None
        raise


def _sibling(sink: Any, collection: str) -> Any:
    """The same client on another collection (an embedded path allows one client per process)."""
    for_collection = getattr(sink, "for_collection", None)
    if for_collection is not None:
        return for_collection(collection)
    view = copy.copy(sink)  # shares the client and its thread; close only `sink`
    view.collection = collection
    return view


async def _vector_size(sink: Any) -> int | None:
    """The collection's vector size, or None when it does not exist."""
    describe = getattr(sink, "vector_size", None)
    try:
        if describe is not None:
            return await describe()

        def size() -> int | None:
            client = sink._client
            if not client.collection_exists(sink.collection):
                return None
            vectors = client.get_collection(sink.collection).config.params.vectors
            return getattr(vectors, "size", None) or -1

        return await sink._call(size)
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"cannot reach Qdrant at {sink.location}: {type(exc).__name__}: {_one_line(exc)}") from None


def _load_embedder(model: str, device: str) -> Any:
    from processors.embedder import SentenceTransformerEmbedder

    try:
        return SentenceTransformerEmbedder(model=model, device=device)
    except Exception as exc:
        raise UserError(f"cannot load model {model!r}: {type(exc).__name__}: {_one_line(exc)}") from None


# ---- search -------------------------------------------------------------------------------


async def search(settings: Settings, query: str, *, limit: int = 5, embedder: Any = None) -> list[Any]:
    """The `limit` nearest points of the configured collection to `query`."""
    if not query.strip():
        raise UserError("the query is empty")
    sink = _open_sink(settings)
    try:
        size = await _vector_size(sink)
        if size is None:
            raise UserError(f"collection {sink.collection!r} does not exist in {sink.location}")
        loop = asyncio.get_running_loop()
        if embedder is None:
            embedder = await loop.run_in_executor(None, _load_embedder, settings.model, settings.device)
        if size != embedder.dim:
            raise UserError(
                f"collection {sink.collection!r} has vectors of size {size}, model {settings.model!r} gives {embedder.dim}; "
                "search with the model that filled it (--model)"
            )
        vector = (await loop.run_in_executor(None, embedder.embed, [query])).vectors[0]
        # Best chunk per document: ask for more chunks than documents wanted, keep each id's first.
        hits = await sink.search(vector, limit=limit * 4)
        best: dict[str, Any] = {}
        for hit in hits:
            best.setdefault(str(hit.payload.get("id", hit.id)), hit)
        return list(best.values())[:limit]
    finally:
        await sink.close()


def format_hits(hits: Sequence[Any], *, width: int = 80) -> list[str]:
    lines = []
    for hit in hits:
        text = " ".join(str(hit.payload.get("text", "")).split())
        if len(text) > width:
            text = text[: width - 3] + "..."
        count = hit.payload.get("chunk_count", 1)
        where = f" [chunk {int(hit.payload.get('chunk_index', 0)) + 1}/{count}]" if isinstance(count, int) and count > 1 else ""
        lines.append(f"{hit.score:.4f}  {hit.payload.get('id', hit.id)}{where}  {text}")
    return lines


# ---- status -------------------------------------------------------------------------------


@dataclass
class PartitionStatus:
    partition: int
    committed: int | None
    """The group's committed offset; None when the group never committed here."""
    log_start: int
    high_watermark: int
    lag: int
    """high_watermark - committed (or - log_start without a commit, where the worker starts)."""
    owner: str | None = None
    """The --metrics-url of the worker that has the partition (when its metrics say so)."""


@dataclass
class WorkerStatus:
    url: str
    reachable: bool
    error: str | None = None
    paused: bool | None = None
    pause_reasons: list[str] = field(default_factory=list)
    processed_total: float | None = None
    rate_per_second: float | None = None
    buffered_messages: float | None = None
    in_flight_batches: float | None = None
    lag_records: float | None = None
    assigned: list[int] = field(default_factory=list)


async def partition_offsets(settings: Settings, *, topic: str | None = None, timeout: float = DEFAULT_TIMEOUT_SECONDS) -> list[PartitionStatus]:
    """Committed offset, high watermark and lag per partition, for the configured group."""
    from aiokafka.errors import KafkaError

    from streams.kafka import make_consumer

    topic = topic or settings.input_topic
    # Committed offsets first: a worker committing meanwhile can only make lag look higher.
    group = make_consumer(settings, request_timeout_ms=int(timeout * 1000) + 5000, client_id="embedworker-status")
    await _start_client(group, settings, timeout)
    try:
        tps = await _topic_partitions(group, topic, timeout)
        committed = {}
        for tp in tps:
            try:
                committed[tp] = await asyncio.wait_for(group.committed(tp), timeout)
            except (KafkaError, asyncio.TimeoutError) as exc:
                raise UserError(f"cannot read the committed offsets of group {settings.group_id!r}: {_one_line(exc) if str(exc) else type(exc).__name__}") from None
    finally:
        await _stop_quietly(group)
    reader = _reader(settings, timeout)
    await _start_client(reader, settings, timeout)
    try:
        beginning, highwater = await _high_watermarks(reader, tps, timeout)
    finally:
        await _stop_quietly(reader)
    rows = []
    for tp in tps:
        start = committed[tp] if committed[tp] is not None else beginning.get(tp, 0)
        rows.append(PartitionStatus(tp.partition, committed[tp], beginning.get(tp, 0), highwater[tp], max(0, highwater[tp] - start)))
    return rows


def _scrape(url: str, timeout: float) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=timeout) as response:
        body = response.read().decode("utf-8", "replace")
    samples = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = float(sample.value)
    return samples


def _value(samples: dict, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


async def worker_metrics(urls: Sequence[str], *, topic: str, interval: float = 1.0, timeout: float = 5.0) -> list[WorkerStatus]:
    """Paused state and processing rate of each worker, from two scrapes `interval` apart."""
    loop = asyncio.get_running_loop()

    async def scrape(url: str) -> tuple[float, Any]:
        try:
            return time.monotonic(), await loop.run_in_executor(None, _scrape, url, timeout)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", None) or exc
            return time.monotonic(), f"{type(exc).__name__}: {_one_line(reason) if isinstance(reason, BaseException) else reason}"

    first = await asyncio.gather(*(scrape(url) for url in urls))
    if interval > 0 and any(not isinstance(s, str) for _, s in first):
        await asyncio.sleep(interval)  # the rate's sampling interval, not synchronization
    second = await asyncio.gather(*(scrape(url) for url in urls))
    out = []
    for url, (t1, s1), (t2, s2) in zip(urls, first, second):
        if isinstance(s2, str) or isinstance(s1, str):
            out.append(WorkerStatus(url, False, error=s2 if isinstance(s2, str) else s1))
            continue
        processed2 = _value(s2, "embedworker_messages_processed_total")
        if processed2 is None:
            out.append(WorkerStatus(url, False, error="no embedworker metrics at this URL"))
            continue
        processed1 = _value(s1, "embedworker_messages_processed_total") or 0.0
        paused = _value(s2, "embedworker_backpressure_paused")
        reasons = sorted(
            dict(labels)["reason"]
            for (name, labels), value in s2.items()
            if name == "embedworker_backpressure_reason_active" and value >= 1
        )
        lag = [v for (name, labels), v in s2.items() if name == "embedworker_consumer_lag_records" and dict(labels).get("topic") == topic]
        assigned = sorted(
            int(dict(labels)["partition"])
            for (name, labels), v in s2.items()
            if name == "embedworker_partition_assigned" and dict(labels).get("topic") == topic and v >= 1
        )
        out.append(
            WorkerStatus(
                url,
                True,
                paused=None if paused is None else paused >= 1,
                pause_reasons=reasons,
                processed_total=processed2,
                rate_per_second=(processed2 - processed1) / (t2 - t1) if t2 > t1 and interval > 0 else None,
                buffered_messages=_value(s2, "embedworker_buffered_messages"),
                in_flight_batches=_value(s2, "embedworker_in_flight_batches"),
                lag_records=sum(lag) if lag else None,
                assigned=assigned,
            )
        )
    return out


async def status(
    settings: Settings, *, metrics_urls: Sequence[str] = (), interval: float = 1.0, timeout: float = DEFAULT_TIMEOUT_SECONDS
) -> dict[str, Any]:
    for url in metrics_urls:
        if not url.startswith(("http://", "https://")):
            raise UserError(f"--metrics-url {url!r} must start with http:// or https://")
    offsets_task = partition_offsets(settings, timeout=timeout)
    if metrics_urls:
        partitions, workers = await asyncio.gather(
            offsets_task, worker_metrics(metrics_urls, topic=settings.input_topic, interval=interval, timeout=min(timeout, 5.0))
        )
    else:
        partitions, workers = await offsets_task, []
    for worker in workers:
        for p in worker.assigned:
            for row in partitions:
                if row.partition == p:
                    row.owner = worker.url
    return {
        "topic": settings.input_topic,
        "group": settings.group_id,
        "partitions": [asdict(p) for p in partitions],
        "total_lag": sum(p.lag for p in partitions),
        "workers": [asdict(w) for w in workers],
    }


def _table(headers: Sequence[str], rows: Iterable[Sequence[Any]], right: set[int]) -> list[str]:
    cells = [list(headers)] + [["-" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return [
        "  ".join(c.rjust(widths[i]) if i in right else c.ljust(widths[i]) for i, c in enumerate(row)).rstrip()
        for row in cells
    ]


def format_status(report: dict[str, Any]) -> list[str]:
    lines = [f"topic {report['topic']}  group {report['group']}"]
    workers = report["workers"]
    by_url = {w["url"]: w for w in workers}
    owned = any(p["owner"] for p in report["partitions"])
    headers = ["partition", "committed", "log end", "lag"]
    if owned:
        headers += ["worker", "paused", "rate/s"]
    rows = []
    for p in report["partitions"]:
        row: list[Any] = [p["partition"], p["committed"], p["high_watermark"], p["lag"]]
        if owned:
            w = by_url.get(p["owner"] or "")
            index = workers.index(w) + 1 if w else None
            row += [f"#{index}" if index else None, _yes_no(w["paused"]) if w else None, _rate(w["rate_per_second"]) if w else None]
        rows.append(row)
    rows.append(["total", "", "", report["total_lag"]] + ([""] * 3 if owned else []))
    lines += _table(headers, rows, right={0, 1, 2, 3})
    if workers:
        lines.append("")
        wrows = []
        for i, w in enumerate(workers, start=1):
            if not w["reachable"]:
                wrows.append([f"#{i}", w["url"], "unreachable: " + (w["error"] or ""), "", "", ""])
                continue
            paused = _yes_no(w["paused"])
            if w["paused"] and w["pause_reasons"]:
                paused += f" ({', '.join(w['pause_reasons'])})"
            processed = None if w["processed_total"] is None else int(w["processed_total"])
            buffered = None if w["buffered_messages"] is None else int(w["buffered_messages"])
            wrows.append([f"#{i}", w["url"], paused, processed, _rate(w["rate_per_second"]), buffered])
        lines += _table(["worker", "metrics url", "paused", "processed", "rate/s", "buffered"], wrows, right={3, 4, 5})
    return lines


def _yes_no(value: bool | None) -> str:
    return "-" if value is None else ("yes" if value else "no")


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


# ---- reembed ------------------------------------------------------------------------------


def model_short_name(model: str) -> str:
    """`sentence-transformers/all-MiniLM-L6-v2` or `/models/all-MiniLM-L6-v2/` -> `all-minilm-l6-v2`."""
    name = Path(model.rstrip("/\\")).name or "model"
    return re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-") or "model"


@dataclass
class ReembedReport:
    source: str
    target: str
    model: str
    model_version: str | None
    read: int = 0
    embedded: int = 0
    failed: int = 0
    skipped: int = 0
    target_count: int = 0


def document_text(chunks: Sequence[dict[str, Any]]) -> str | None:
    """A document's (normalized) text from its chunks' payloads: their spans, overlaps removed."""
    ordered = sorted(chunks, key=lambda p: int(p.get("chunk_index", 0)))
    if len(ordered) == 1:
        text = ordered[0].get("text")
        return text if isinstance(text, str) else None
    parts: list[str] = []
    covered = 0
    for payload in ordered:
        text, start = payload.get("text"), payload.get("chunk_start")
        if not isinstance(text, str) or not isinstance(start, int):
            return None
        parts.append(text[max(0, covered - start):])
        covered = max(covered, start + len(text))
    return "".join(parts)


async def _collection_batches(source: Any, batch_size: int, report: ReembedReport) -> AsyncIterator[list[Any]]:
    """The source's documents (chunks put back together), `batch_size` at a time."""
    from schemas import InputEvent

    documents: dict[str, list[dict[str, Any]]] = {}
    for point in await source.points(with_vectors=False):
        event_id = point.payload.get("id")
        if not isinstance(event_id, str):
            report.read += 1
            report.skipped += 1
            continue
        documents.setdefault(event_id, []).append(point.payload)
    events = []
    for event_id, chunks in documents.items():
        report.read += 1
        text = document_text(chunks)
        if text is None or not text.strip():
            report.skipped += 1
            continue
        first = min(chunks, key=lambda p: int(p.get("chunk_index", 0)))
        metadata = first.get("metadata")
        events.append(InputEvent(id=event_id, text=text, metadata=metadata if isinstance(metadata, dict) else {}))
        if len(events) >= batch_size:
            yield events
            events = []
    if events:
        yield events


async def _topic_batches(
    settings: Settings, topic: str, *, start: int | None, end: int | None, partitions: Sequence[int] | None,
    batch_size: int, timeout: float, report: ReembedReport, ranges: dict[int, tuple[int, int]],
) -> AsyncIterator[list[Any]]:
    """Decoded events of [start, end) of each partition (end: the high watermark at start-up)."""
    from aiokafka.errors import KafkaError

    from schemas import InvalidEvent, Limits, decode_input

    reader = _reader(settings, timeout, max_partition_fetch_bytes=max(1_048_576, settings.max_message_bytes + 1024))
    await _start_client(reader, settings, timeout)
    try:
        tps = await _topic_partitions(reader, topic, timeout)
        if partitions:
            unknown = sorted(set(partitions) - {tp.partition for tp in tps})
            if unknown:
                raise UserError(f"topic {topic!r} has no partition {unknown[0]} (partitions 0-{len(tps) - 1})")
            tps = [tp for tp in tps if tp.partition in set(partitions)]
        beginning, highwater = await _high_watermarks(reader, tps, timeout)
        for tp in tps:
            first = max(beginning[tp], start if start is not None else 0)
            last = min(highwater[tp], end if end is not None else highwater[tp])
            ranges[tp.partition] = (first, max(first, last))
        yield []  # lets the caller size its progress bar from `ranges`
        todo = {tp for tp in tps if ranges[tp.partition][0] < ranges[tp.partition][1]}
        for tp in tps:
            reader.seek(tp, ranges[tp.partition][0])
        done = [tp for tp in tps if tp not in todo]
        if done:
            reader.pause(*done)
        limits = Limits(max_message_bytes=settings.max_message_bytes, max_text_bytes=settings.max_text_bytes)
        events: list[Any] = []
        idle_deadline = time.monotonic() + timeout
        while todo:
            try:
                fetched = await reader.getmany(*todo, timeout_ms=500, max_records=batch_size)
            except KafkaError as exc:
                raise UserError(f"reading {topic!r} failed: {type(exc).__name__}: {_one_line(exc)}") from None
            if any(fetched.values()):
                idle_deadline = time.monotonic() + timeout
            elif time.monotonic() > idle_deadline:
                left = ", ".join(str(tp.partition) for tp in sorted(todo, key=lambda t: t.partition))
                raise UserError(f"no records from partition(s) {left} of {topic!r} for {timeout:g}s")
            for tp, messages in fetched.items():
                stop = ranges[tp.partition][1]
                for message in messages:
                    if message.offset >= stop:
                        break
                    report.read += 1
                    try:
                        events.append(decode_input(message.value, limits, key=message.key))
                    except InvalidEvent:
                        report.skipped += 1
                if tp in todo and await reader.position(tp) >= stop:
                    todo.discard(tp)
                    reader.pause(tp)
            while len(events) >= batch_size:
                yield events[:batch_size]
                events = events[batch_size:]
        if events:
            yield events
    finally:
        await _stop_quietly(reader)


async def reembed(
    settings: Settings,
    *,
    model: str,
    target: str | None = None,
    from_collection: str | None = None,
    from_topic: str | None = None,
    start_offset: int | None = None,
    end_offset: int | None = None,
    partitions: Sequence[int] | None = None,
    batch_size: int = 256,
    timeout: float = DEFAULT_TIMEOUT_SECONDS,
    embedder: Any = None,
) -> ReembedReport:
    """Embed the texts of a collection, or of a range of the input topic, into a new collection."""
    from processors.sink import SinkConfigError

    if (from_collection is None) == (from_topic is None):
        raise UserError("give exactly one source: --from-collection or --from-topic")
    if from_collection is not None and (start_offset is not None or end_offset is not None or partitions):
        raise UserError("--start-offset, --end-offset and --partition only apply to --from-topic")
    if start_offset is not None and end_offset is not None and end_offset < start_offset:
        raise UserError(f"--end-offset {end_offset} is below --start-offset {start_offset}")
    target = target or f"{settings.collection}-{model_short_name(model)}"
    if from_collection is not None and target == from_collection:
        raise UserError(f"the target collection must differ from the source {from_collection!r} (--target-collection)")
    sink = _open_sink(settings, target, must_exist_path=from_collection is not None)
    loop = asyncio.get_running_loop()
    from processors.pipeline import Pipeline

    report = ReembedReport(source="", target=target, model=model, model_version=None)
    pipeline = None
    try:
        source_sink = None
        total: int | None = None
        if from_collection is not None:
            source_sink = _sibling(sink, from_collection)
            if await _vector_size(source_sink) is None:
                raise UserError(f"collection {from_collection!r} does not exist in {sink.location}")
            total = await source_sink.count()
            report.source = f"collection {from_collection}"
        else:
            report.source = f"topic {from_topic}"
        existing = await _vector_size(sink)
        if embedder is None:
            embedder = await loop.run_in_executor(None, _load_embedder, model, settings.device)
        if existing is not None and existing != embedder.dim:
            raise UserError(f"target collection {target!r} has vectors of size {existing}, model {model!r} gives {embedder.dim}")
        report.model_version = getattr(embedder, "version", None)
        pipeline = Pipeline(
            embedder=embedder, sink=sink, cache=None, store_text=settings.store_text,
            long_text=settings.long_text, chunk_overlap_tokens=settings.chunk_overlap_tokens,
        )
        try:
            await pipeline.start()
        except SinkConfigError as exc:
            raise UserError(str(exc)) from None

        ranges: dict[int, tuple[int, int]] = {}
        if source_sink is not None:
            batches = _collection_batches(source_sink, batch_size, report)
        else:
            batches = _topic_batches(
                settings, from_topic, start=start_offset, end=end_offset, partitions=partitions,  # type: ignore[arg-type]
                batch_size=batch_size, timeout=timeout, report=report, ranges=ranges,
            )
        in_flight: set[asyncio.Task[Any]] = set()
        bar = None
        try:
            async for events in batches:
                if bar is None:
                    if total is None:
                        total = sum(b - a for a, b in ranges.values())
                    bar = _progress(total, f"re-embedding into {target}", "text")
                if not events:
                    continue
                while len(in_flight) >= 2:  # two batches overlap: one embeds while one upserts
                    finished, in_flight = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
                    for task in finished:
                        _count(task.result(), report, bar)
                # The turn is taken here, in read order: a later version of an id lands last.
                in_flight.add(asyncio.create_task(pipeline.process(events, turn=pipeline.take_turn())))
            for task in asyncio.as_completed(list(in_flight)):
                _count(await task, report, bar)
            in_flight.clear()
        finally:
            for task in in_flight:
                task.cancel()
            if bar is not None:
                bar.close()
        report.target_count = await sink.count()
        return report
    finally:
        if pipeline is not None:
            await pipeline.close()
        await sink.close()


def _count(outcomes: Sequence[Any], report: ReembedReport, bar: Any) -> None:
    for outcome in outcomes:
        if outcome.result is not None:
            report.embedded += 1
        else:
            report.failed += 1
    if bar is not None:
        bar.update(report.embedded + report.failed + report.skipped - bar.n)
