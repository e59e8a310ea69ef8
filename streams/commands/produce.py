"""`embedworker produce`: lines, JSON lines or CSV into input events, sent with every acknowledgement awaited."""

from __future__ import annotations

import csv
import io
import sys
from pathlib import Path
from typing import IO, Any, Iterator, Sequence

import orjson

from streams.config import Settings
from streams.commands.common import DEFAULT_TIMEOUT_SECONDS, FORMATS, UserError, _one_line, _progress, _start_client, _stop_quietly




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
    from streams.backends.kafka import make_producer

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

