"""`embedworker dlq replay`: re-publish dead letters' original events to the input topic.

Reads the dead-letter topic from its log start to its high watermark as of start-up with
a group-less reader (nothing is committed; every run looks at the whole topic, so narrow
it with `--since`, `--error-type` and `--limit`), and sends each chosen dead letter's
original payload, with its original key and the headers it carried, to the input topic.
Each replay adds one to the `embedworker-replay-count` header; the worker copies that header
onto the next dead letter, so a message that keeps failing stops being replayed once its
count reaches `--max-replays`. A dead letter without its whole payload (cut to fit, or
none) is never replayed: publishing a cut event would write something nobody sent.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Sequence

from streams.config import Settings
from streams.commands.common import (
    DEFAULT_TIMEOUT_SECONDS, IdleFetch, UserError, _high_watermarks, _one_line, _reader, _start_client, _stop_quietly, _topic_partitions,
)
from streams.terminal import printable

DEFAULT_MAX_REPLAYS = 3
MAX_REPORTED = 20
"""Refused dead letters named one by one; beyond this only counted (a topic may hold millions)."""

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_since(text: str, *, now: float | None = None) -> float:
    """`--since`: a duration back from now (`90s`, `30m`, `1h`, `2d`, `1w`) or an ISO-8601 time
    (UTC unless it names an offset), as POSIX seconds. Raises ValueError."""
    match = _DURATION.match(text)
    if match:
        return (time.time() if now is None else now) - float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"expected a duration such as 1h or 30m, or an ISO-8601 time, got {text!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


@dataclass(kw_only=True)
class ReplayReport:
    dlq_topic: str
    input_topic: str
    dry_run: bool
    read: int = 0
    replayed: int = 0
    """Sent and acknowledged (with --dry-run: would have been sent)."""
    past_limit: int = 0
    not_replayable: int = 0
    filtered_out: int = 0
    stopped_at_limit: bool = False
    refused: list[str] = field(default_factory=list)
    """The first `MAX_REPORTED` dead letters not replayed for a reason of their own (no payloads),
    escaped for a terminal: their source topic and error type come from the dead letter itself."""

    def summary(self) -> str:
        verb = "would replay" if self.dry_run else "replayed"
        line = (
            f"{verb} {self.replayed} dead letters from {self.dlq_topic} to {self.input_topic}; "
            f"skipped past limit {self.past_limit}, not replayable {self.not_replayable}, filtered out {self.filtered_out}"
        )
        return printable(line + (" (stopped at --limit)" if self.stopped_at_limit else ""))


def _refuse(report: ReplayReport, where: str, why: str) -> None:
    if len(report.refused) < MAX_REPORTED:
        report.refused.append(printable(f"{where}: {why}"))


async def replay_dead_letters(
    settings: Settings,
    *,
    error_types: Sequence[str] = (),
    since: float | None = None,
    limit: int | None = None,
    max_replays: int = DEFAULT_MAX_REPLAYS,
    dry_run: bool = False,
    timeout: float = DEFAULT_TIMEOUT_SECONDS,
) -> ReplayReport:
    """Replay the chosen dead letters of `settings.dlq_topic` to `settings.input_topic`."""
    from aiokafka.errors import KafkaError

    from schemas import REPLAY_COUNT_HEADER, InvalidEvent, decode_dead_letter, replay_count
    from streams.backends.kafka import make_producer

    if max_replays < 1:
        raise UserError(f"--max-replays must be at least 1, got {max_replays}")
    report = ReplayReport(dlq_topic=settings.dlq_topic, input_topic=settings.input_topic, dry_run=dry_run)
    wanted_types = set(error_types)
    since_ms = None if since is None else since * 1000
    # A dead letter is at most about twice the largest input (escaped) plus its envelope.
    reader = _reader(settings, timeout, max_partition_fetch_bytes=max(1_048_576, 2 * settings.max_message_bytes + 131_072))
    await _start_client(reader, settings, timeout)
    producer = None
    pending: list[Any] = []

    async def settle() -> None:
        for future in pending:
            await future
            report.replayed += 1
        pending.clear()

    try:
        tps = await _topic_partitions(reader, settings.dlq_topic, timeout)
        beginning, highwater = await _high_watermarks(reader, tps, timeout)
        todo = {tp for tp in tps if beginning[tp] < highwater[tp]}
        for tp in tps:
            reader.seek(tp, beginning[tp])
        if set(tps) - todo:
            reader.pause(*(set(tps) - todo))
        if todo and not dry_run:
            producer = make_producer(settings, request_timeout_ms=int(timeout * 1000) + 5000, client_id="embedworker-dlq")
            await _start_client(producer, settings, timeout)
        chosen = 0  # replays sent or (dry run) due: what --limit counts
        fetch = IdleFetch(reader, settings.dlq_topic, timeout)
        while todo and not report.stopped_at_limit:
            fetched = await fetch(todo, 500)
            for tp, records in fetched.items():
                stop = highwater[tp]  # the end as of start: replays that fail again land past it
                for record in records:
                    if record.offset >= stop:
                        break
                    if limit is not None and chosen >= limit:
                        report.stopped_at_limit = True
                        break
                    report.read += 1
                    where = f"{tp.topic}[{tp.partition}]@{record.offset}"
                    if since_ms is not None and (record.timestamp or 0) < since_ms:
                        report.filtered_out += 1
                        continue
                    try:
                        letter = decode_dead_letter(record.value)
                    except InvalidEvent as exc:
                        report.not_replayable += 1
                        _refuse(report, where, f"not a dead letter ({exc.message})")
                        continue
                    if wanted_types and letter.error_type not in wanted_types:
                        report.filtered_out += 1
                        continue
                    if letter.source is not None:
                        where += f" (source {letter.source.topic}[{letter.source.partition}]@{letter.source.offset}, {letter.error_type})"
                    if letter.payload is None:
                        report.not_replayable += 1
                        _refuse(report, where, "payload truncated, not replayable" if letter.missing == "truncated"
                                else "no payload, not replayable")
                        continue
                    count = replay_count(record.headers)
                    if count is None:
                        report.not_replayable += 1
                        _refuse(report, where, f"malformed {REPLAY_COUNT_HEADER} header, not replayable")
                        continue
                    if count >= max_replays:
                        report.past_limit += 1
                        _refuse(report, where, f"replayed {count} times already (--max-replays {max_replays}), not replayed")
                        continue
                    chosen += 1
                    if dry_run:
                        report.replayed += 1
                        continue
                    headers = [(k, v) for k, v in (record.headers or ()) if k != REPLAY_COUNT_HEADER]
                    headers.append((REPLAY_COUNT_HEADER, str(count + 1).encode("ascii")))
                    assert producer is not None
                    pending.append(await producer.send(settings.input_topic, value=letter.payload, key=record.key, headers=headers))
                    if len(pending) >= 1000:
                        await settle()
                if tp in todo and (report.stopped_at_limit or await reader.position(tp) >= stop):
                    todo.discard(tp)
                    reader.pause(tp)
        await settle()
    except KafkaError as exc:
        raise UserError(
            f"replaying to {settings.input_topic} failed after {report.replayed} acknowledged: {type(exc).__name__}: {_one_line(exc)}"
        ) from None
    finally:
        if producer is not None:
            await _stop_quietly(producer)
        await _stop_quietly(reader)
    return report
