"""`embedworker reembed`: a collection (chunks put back together) or a topic range into a new collection, in order."""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Sequence

from streams.config import Settings
from streams.commands.common import DEFAULT_TIMEOUT_SECONDS, UserError, _high_watermarks, _load_embedder, _one_line, _open_sink, _progress, _reader, _sibling, _start_client, _stop_quietly, _topic_partitions, _vector_size




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
