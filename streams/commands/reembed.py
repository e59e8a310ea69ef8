"""`embedworker reembed`: a collection (chunks put back together) or a topic range into a new collection, in order."""

from __future__ import annotations

import asyncio
import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, NamedTuple, Sequence

from streams.config import Settings
from streams.commands.common import DEFAULT_TIMEOUT_SECONDS, IdleFetch, UserError, _high_watermarks, _load_embedder, _open_sink, _progress, _reader, _sibling, _start_client, _stop_quietly, _topic_partitions, _vector_size




def model_short_name(model: str) -> str:
    """`sentence-transformers/all-MiniLM-L6-v2` or `/models/all-MiniLM-L6-v2/` -> `all-minilm-l6-v2`."""
    name = Path(model.rstrip("/\\")).name or "model"
    return re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-") or "model"


# Inconsistent documents named in the report (escaped); the rest are only counted.
MAX_REPORTED_IDS = 20


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
    inconsistent: int = 0
    """Documents of the source collection whose chunks are no one version (see `rebuild_document`): not written."""
    inconsistent_ids: list[str] = field(default_factory=list)
    """The first `MAX_REPORTED_IDS` of them, each id as a Python literal (`repr`: quoted, control characters escaped)."""


class Rebuilt(NamedTuple):
    text: str | None
    """The document's text; None when it cannot be rebuilt."""
    problem: str | None = None
    """Why not (None: rebuilt, or a document without stored text)."""
    inconsistent: bool = False
    """The chunks are not one version of the document (a mix, or one missing): a later read may succeed."""


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def rebuild_document(chunks: Sequence[dict[str, Any]]) -> Rebuilt:
    """A document's text from its chunks' payloads, only when they are one complete version of it.

    The source collection may be written while it is read, and a paged scroll is no snapshot:
    it can return v2's chunks 0-1 beside v1's chunks 2-4. The payload has no per-document hash
    or version, so this is the strongest check it allows; every chunk must
    - agree on `chunk_count` n, with `chunk_index` 0..n-1 each exactly once;
    - agree on `metadata` (a document's chunks are written with the same one);
    - (n > 1) carry its `text` and a `chunk_start`/`chunk_end` span of that length (a chunk's
      text is its span of the normalized document); chunk 0 starts at 0, and each next span
      starts and ends no earlier than the one before and starts no later than it ends, with the
      overlapped characters equal in both texts. The text is the spans joined, overlaps once.
    A one-chunk document (n = 1, index 0, or a legacy point without these fields) is its text
    as sent; its span is of the normalized text, so it is not compared.

    Anything else is `inconsistent` (a chunk missing, an index twice or out of range, counts or
    metadata that disagree, a span that is not its text's, overlaps that differ). Not caught:
    two versions chunked at the same offsets whose chunks differ only outside the overlaps
    (edits in two chunks' own parts). A gap between two spans is what chunking with
    chunk_overlap_tokens=0 leaves (the whitespace between tokens is in no chunk): that text is
    stored nowhere, so such a document is not rebuilt either, but not counted as inconsistent.
    """
    if not chunks:
        return Rebuilt(None, "no chunks", True)
    indexed: dict[int, dict[str, Any]] = {}
    counts: set[int | None] = set()
    for payload in chunks:
        raw_index, raw_count = payload.get("chunk_index", 0), payload.get("chunk_count", 1)
        index, count = _int(raw_index), _int(raw_count)
        if index is None or count is None:
            return Rebuilt(None, f"chunk_index {raw_index!r} / chunk_count {raw_count!r} not integers", True)
        if index in indexed:
            return Rebuilt(None, f"chunk {index} twice", True)
        indexed[index] = payload
        counts.add(count)
    if len(counts) > 1:
        return Rebuilt(None, f"chunk counts disagree: {sorted(counts)}", True)  # type: ignore[type-var]
    n = counts.pop()
    assert n is not None
    missing = sorted(set(range(n)) - set(indexed))
    if missing or len(indexed) != n:
        stray = sorted(set(indexed) - set(range(n)))
        why = f"chunk {missing[0]} of {n} missing" if missing else f"chunk {stray[0]} beyond chunk_count {n}"
        return Rebuilt(None, why, True)
    ordered = [indexed[i] for i in range(n)]
    metadata = ordered[0].get("metadata")
    if any(p.get("metadata") != metadata for p in ordered[1:]):
        return Rebuilt(None, "chunks carry different metadata", True)
    versions = {(p.get("version_source"), p.get("version")) for p in ordered}
    if len(versions) > 1:  # every chunk of one write carries that write's version
        return Rebuilt(None, "chunks carry different versions", True)
    if n == 1:
        text = ordered[0].get("text")
        return Rebuilt(text if isinstance(text, str) else None)
    if not all(isinstance(p.get("text"), str) for p in ordered):
        return Rebuilt(None)  # stored without text: nothing to check or rebuild
    spans: list[tuple[int, int, str]] = []
    for i, payload in enumerate(ordered):
        start, end, text = _int(payload.get("chunk_start")), _int(payload.get("chunk_end")), payload["text"]
        if start is None or end is None or end - start != len(text):
            span = f"{payload.get('chunk_start')!r}-{payload.get('chunk_end')!r}"
            return Rebuilt(None, f"chunk {i}: span {span} is not its text's ({len(text)} characters)", True)
        spans.append((start, end, text))
    if spans[0][0] != 0:
        return Rebuilt(None, f"chunk 0 starts at {spans[0][0]}", True)
    parts = [spans[0][2]]
    for i in range(1, n):
        (start0, end0, text0), (start1, end1, text1) = spans[i - 1], spans[i]
        if start1 < start0 or end1 < end0:
            return Rebuilt(None, f"chunk {i} ({start1}-{end1}) goes back from chunk {i - 1} ({start0}-{end0})", True)
        if start1 > end0:
            return Rebuilt(None, f"gap between chunks {i - 1} and {i} ({end0}-{start1}): that text is in no chunk")
        if text0[start1 - start0:] != text1[:end0 - start1]:
            return Rebuilt(None, f"chunks {i - 1} and {i} differ on their overlap", True)
        parts.append(text1[end0 - start1:])
    return Rebuilt("".join(parts))


def document_text(chunks: Sequence[dict[str, Any]]) -> str | None:
    """A document's (normalized) text from its chunks' payloads; None unless they are one version (`rebuild_document`)."""
    return rebuild_document(chunks).text


async def _collection_batches(source: Any, batch_size: int, report: ReembedReport) -> AsyncIterator[list[Any]]:
    """The source's documents (chunks put back together) with their stored versions, `batch_size` at a time.

    The version is copied: a copy is exactly as new as what it copies, so a dual write or the
    worker's own later write of the same document is never overwritten by it.

    `points()` reads every scroll page before anything is grouped, so a document's chunks are
    put together wherever the pages cut. A document whose chunks are no one version (written
    while this ran) is skipped and counted in `report.inconsistent`: its text never existed.
    """
    from processors.sink import stored_head
    from schemas import InputEvent

    documents: dict[tuple[str | None, str], list[dict[str, Any]]] = {}
    for point in await source.points(with_vectors=False):
        event_id, tenant = point.payload.get("id"), point.payload.get("tenant")
        if not isinstance(event_id, str) or not (tenant is None or isinstance(tenant, str)):
            report.read += 1
            report.skipped += 1
            continue
        documents.setdefault((tenant, event_id), []).append(point.payload)  # two tenants' doc-1 are two documents
    events = []
    for (tenant, event_id), chunks in documents.items():
        report.read += 1
        rebuilt = rebuild_document(chunks)
        if rebuilt.inconsistent:
            report.inconsistent += 1
            if len(report.inconsistent_ids) < MAX_REPORTED_IDS:
                report.inconsistent_ids.append(repr(event_id if len(event_id) <= 200 else event_id[:200] + "..."))
            continue
        text = rebuilt.text
        if text is None or not text.strip():
            report.skipped += 1
            continue
        head = min(chunks, key=lambda p: p.get("chunk_index", 0))
        metadata = head.get("metadata")
        event = InputEvent(id=event_id, text=text, metadata=metadata if isinstance(metadata, dict) else {}, tenant=tenant)
        events.append((event, stored_head(head).version))
        if len(events) >= batch_size:
            yield events
            events = []
    if events:
        yield events


async def _topic_batches(
    settings: Settings, topic: str, *, start: int | None, end: int | None, partitions: Sequence[int] | None,
    batch_size: int, timeout: float, report: ReembedReport, ranges: dict[int, tuple[int, int]],
) -> AsyncIterator[list[Any]]:
    """Decoded events of [start, end) of each partition (end: the high watermark at start-up), each with
    the version the worker gives it (its offset in its partition), so the copy and the live stream agree."""
    from schemas import InvalidEvent, Limits, Version
    from schemas.mapping import decode_record
    from schemas.tenancy import with_tenant
    from streams.assembly import build_tenant_source

    tenants = build_tenant_source(settings)
    from streams.assembly import build_mapping

    mapping = build_mapping(settings)

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
        fetch = IdleFetch(reader, topic, timeout)
        while todo:
            fetched = await fetch(todo, batch_size)
            for tp, messages in fetched.items():
                stop = ranges[tp.partition][1]
                for message in messages:
                    if message.offset >= stop:
                        break
                    report.read += 1
                    try:
                        decoded = decode_record(message.value, message.key, message.headers or (), mapping, limits)
                        if tenants is not None:
                            decoded = dataclasses.replace(decoded, event=with_tenant(decoded.event, tenants, message.value, message.headers or ()))
                        own = decoded.version
                        version = Version("user", own) if own is not None else Version(f"{tp.topic}/{tp.partition}", message.offset)
                        events.append((decoded.event, version))
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
    store: Any = None,
    on_progress: Any = None,
) -> ReembedReport:
    """Embed the texts of a collection, or of a range of the input topic, into a new collection."""
    from processors.errors import SinkConfigError

    if (from_collection is None) == (from_topic is None):
        raise UserError("give exactly one source: --from-collection or --from-topic")
    if from_collection is not None and (start_offset is not None or end_offset is not None or partitions):
        raise UserError("--start-offset, --end-offset and --partition only apply to --from-topic")
    if start_offset is not None and end_offset is not None and end_offset < start_offset:
        raise UserError(f"--end-offset {end_offset} is below --start-offset {start_offset}")
    target = target or f"{settings.collection}-{model_short_name(model)}"
    if from_collection is not None and target == from_collection:
        raise UserError(f"the target collection must differ from the source {from_collection!r} (--target-collection)")
    # `store`: an open store to work on (a migration in the worker's process): a view of it, left open.
    sink = store.for_collection(target) if store is not None else _open_sink(settings, target, must_exist_path=from_collection is not None)
    loop = asyncio.get_running_loop()
    from streams.assembly import build_pipeline, close_all

    report = ReembedReport(source="", target=target, model=model, model_version=None)
    pipeline = None
    owned_embedder = None
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
            embedder = owned_embedder = await loop.run_in_executor(None, _load_embedder, settings, model)
        if existing is not None and existing != embedder.dim:
            raise UserError(f"target collection {target!r} has vectors of size {existing}, model {model!r} gives {embedder.dim}")
        report.model_version = getattr(embedder, "version", None)
        pipeline = build_pipeline(settings, embedder=embedder, sink=sink, cache=None)
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
                    if on_progress is not None:
                        await on_progress(report, total)  # `migrate status` shows how far a backfill got
                # The turn is taken here, in read order: a later version of an id lands last.
                documents, versions = [e for e, _ in events], [v for _, v in events]
                in_flight.add(asyncio.create_task(pipeline.process(documents, turn=pipeline.take_turn(), versions=versions)))
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
        await close_all([owned_embedder] + ([sink] if store is None else []))


def _count(outcomes: Sequence[Any], report: ReembedReport, bar: Any) -> None:
    for outcome in outcomes:
        if outcome.result is not None:
            report.embedded += 1
        else:
            report.failed += 1
    if bar is not None:
        bar.update(report.embedded + report.failed + report.skipped - bar.n)
