"""What the operator commands share: `UserError`, bounded Kafka waits, and opening the store.

Each command (`produce`, `search`, `status`, `reembed`, one file each) takes `Settings` plus
its own arguments and raises `UserError` (one line, no traceback) for anything the user
can fix: a missing file, a bad record, an unreachable broker or store, a missing
collection. Network waits are bounded.

Kafka notes (see FINDINGS): the local broker's `end_offsets` (ListOffsets latest)
under-reports, so log-end offsets come from a fetch response's high watermark
(`consumer.highwater`), read by a group-less consumer; committed offsets come from a
consumer's `committed()`, never from the admin client.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from typing import Any, Sequence

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


class IdleFetch:
    """Fetch rounds of a group-less reader that give up after `timeout` seconds without a record."""

    def __init__(self, reader: Any, topic: str, timeout: float) -> None:
        self.reader, self.topic, self.timeout = reader, topic, timeout
        self._idle_deadline = time.monotonic() + timeout

    async def __call__(self, todo: set[Any], max_records: int) -> dict[Any, list[Any]]:
        from aiokafka.errors import KafkaError

        try:
            fetched = await self.reader.getmany(*todo, timeout_ms=500, max_records=max_records)
        except KafkaError as exc:
            raise UserError(f"reading {self.topic!r} failed: {type(exc).__name__}: {_one_line(exc)}") from None
        if any(fetched.values()):
            self._idle_deadline = time.monotonic() + self.timeout
        elif time.monotonic() > self._idle_deadline:
            left = ", ".join(str(tp.partition) for tp in sorted(todo, key=lambda t: t.partition))
            raise UserError(f"no records from partition(s) {left} of {self.topic!r} for {self.timeout:g}s")
        return fetched


def _reader(settings: Settings, timeout: float, **overrides: Any) -> Any:
    """A group-less consumer (assigns, never joins or commits)."""
    from streams.backends.kafka import make_consumer

    kwargs: dict[str, Any] = dict(
        group_id=None, fetch_max_wait_ms=100, request_timeout_ms=int(timeout * 1000) + 5000,
        client_id="embedworker-tools",
    )
    kwargs.update(overrides)
    return make_consumer(settings, **kwargs)


# ---- Qdrant helpers -----------------------------------------------------------------------


def _open_sink(settings: Settings, collection: str | None = None, *, must_exist_path: bool = True) -> Any:
    """The sink on the configured server or embedded path (either engine); never the in-memory store."""
    from processors.errors import SinkConfigError
    from streams.assembly import build_sink

    if not settings.qdrant_url and not settings.qdrant_path:
        raise UserError("no Qdrant configured: set EMBEDWORKER_QDRANT_URL or EMBEDWORKER_QDRANT_PATH (--qdrant-url, --qdrant-path)")
    if settings.qdrant_path and must_exist_path and not os.path.isdir(settings.qdrant_path):
        raise UserError(f"no Qdrant store at {settings.qdrant_path}")
    try:
        return build_sink(settings, collection)
    except SinkConfigError as exc:
        raise UserError(str(exc)) from None


def _sibling(sink: Any, collection: str) -> Any:
    """The same engine on another collection (an embedded path allows one client per process)."""
    return sink.for_collection(collection)


async def _vector_size(sink: Any) -> int | None:
    """The collection's vector size, or None when it does not exist."""
    from processors.errors import SinkConfigError

    try:
        return await sink.vector_size()
    except SinkConfigError as exc:
        raise UserError(str(exc)) from None
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"cannot reach Qdrant at {sink.location}: {type(exc).__name__}: {_one_line(exc)}") from None


def _load_embedder(settings: Settings, model: str | None = None) -> Any:
    """The embedder the worker would build (`streams.assembly.build_embedder`), on `model` if given."""
    from streams.assembly import build_embedder

    try:
        return build_embedder(settings, model=model)
    except Exception as exc:
        raise UserError(f"cannot load model {model or settings.model!r}: {type(exc).__name__}: {_one_line(exc)}") from None
