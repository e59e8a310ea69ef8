"""`embedworker status`: committed offsets, lag, and what each worker's /metrics says."""

from __future__ import annotations

import asyncio
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Sequence

from streams.config import Settings
from streams.commands.common import DEFAULT_TIMEOUT_SECONDS, UserError, _high_watermarks, _one_line, _reader, _start_client, _stop_quietly, _topic_partitions
from streams.terminal import printable




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

    from streams.backends.kafka import make_consumer

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
    # Escaped before measuring: the columns line up on what the terminal shows.
    cells = [list(headers)] + [["-" if c is None else printable(str(c)) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return [
        "  ".join(c.rjust(widths[i]) if i in right else c.ljust(widths[i]) for i, c in enumerate(row)).rstrip()
        for row in cells
    ]


def format_status(report: dict[str, Any]) -> list[str]:
    """The report as lines for a terminal: every name, URL, pause reason and error escaped
    (`streams.terminal`), since they come from settings, the broker and metrics endpoints."""
    lines = [f"topic {printable(str(report['topic']))}  group {printable(str(report['group']))}"]
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

