"""The collection mirrors the stream: ordered updates, deletes in both forms, long documents as chunks.

Real broker, real Redis (made slow on purpose so batches overtake each other), the real
Qdrant engine and the bundled model. Every check counts, per id, stale versions (a point
holding anything but the id's last event) and resurrected deletes; both must be 0.
"""

from __future__ import annotations

import asyncio
import random
import signal
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import numpy as np
import orjson
import pytest

from doubles import FailingSink, SlowCache
from schemas import normalize_text
from streams.runtime import WorkerObserver
from streams.commands.reembed import document_text
from support import (
    LatencyProxy, committed_offsets, make_cache, make_settings, make_sink, produce, read_topic, running_worker, until,
)
from test_faults import _no_worker_outlives_its_test, open_store, start_worker, worker_env  # noqa: F401  (the fixture)

pytestmark = pytest.mark.integration

SENTENCES = [
    "The nightly export finished late because the storage node was rebooted.",
    "Customers in the north region reported slow searches after the upgrade.",
    "A new index on the orders table cut the report time in half.",
    "The on-call engineer rolled back the release at three in the morning.",
    "Invoices are generated on the first business day of every month.",
    "The mobile app now caches the last twenty documents for offline reading.",
    "Rate limits apply per API key and reset every sixty seconds.",
    "Backups are encrypted at rest and kept for ninety days.",
]


@dataclass
class Stream:
    keys: list[bytes | None] = field(default_factory=list)
    values: list[bytes | None] = field(default_factory=list)
    last: dict[str, dict[str, Any] | None] = field(default_factory=dict)
    """Per id, the body of its last upsert, or None when its last event deletes it."""
    deletes: int = 0
    long_documents: int = 0

    def add(self, doc_id: str, value: bytes | None, body: dict[str, Any] | None, *, key: bytes | None = None) -> None:
        self.keys.append(key if key is not None else doc_id.encode())
        self.values.append(value)
        self.last[doc_id] = body


def random_stream(rng: random.Random, *, events: int, ids: int) -> Stream:
    """Upserts, same-id updates (new text; same text with new metadata), deletes (both forms), long documents."""
    stream = Stream()
    texts: dict[str, str] = {}
    for n in range(events):
        doc_id = f"doc-{rng.randrange(ids)}"
        roll = rng.random()
        if roll < 0.06:
            stream.add(doc_id, None, None)  # tombstone
            stream.deletes += 1
            continue
        if roll < 0.12:
            stream.add(doc_id, orjson.dumps({"id": doc_id, "op": "delete"}), None)
            stream.deletes += 1
            continue
        if roll < 0.30 and doc_id in texts:
            text = texts[doc_id]  # same text, new metadata
        elif roll < 0.36:
            sentences = rng.randint(25, 60)  # 2-5 chunks of the bundled model
            text = " ".join(rng.choice(SENTENCES) for _ in range(sentences))
            stream.long_documents += 1
        else:
            text = f"{rng.choice(SENTENCES)} Ticket {rng.randrange(400)}."
        texts[doc_id] = text
        body = {"id": doc_id, "text": text, "metadata": {"n": n}}
        stream.add(doc_id, orjson.dumps(body), body)
    return stream


DEBEZIUM_MAPPING = {"EMBEDWORKER_INPUT_FORMAT": "debezium", "EMBEDWORKER_TEXT_FROM": "{title}\\n\\n{body}",
                    "EMBEDWORKER_METADATA_FROM": "lang,n"}
"""A Postgres table `docs(id int, title, body, lang, n)` through Debezium's JSON converter."""


def debezium_stream(rng: random.Random, *, events: int, ids: int) -> Stream:
    """Debezium change events of one table, as its Postgres connector writes them: create and snapshot
    reads, updates (new text; metadata only), deletes each followed by a tombstone, long bodies; both
    envelopes (with and without the schema), the key a JSON struct, `source.lsn` rising."""
    stream, rows, lsn = Stream(), {}, 24_000_000
    for n in range(events):
        row_id = rng.randrange(ids)
        doc_id, key = str(row_id), orjson.dumps({"id": row_id})
        lsn += rng.randint(8, 400)
        source = {"version": "2.5.0.Final", "connector": "postgresql", "name": "db", "ts_ms": 1_733_000_000_000 + n,
                  "db": "app", "schema": "public", "table": "docs", "lsn": lsn}
        roll = rng.random()
        if roll < 0.08 and row_id in rows:
            change = {"before": rows.pop(row_id), "after": None, "op": "d", "source": source, "ts_ms": source["ts_ms"]}
            stream.add(doc_id, _envelope(rng, change), None, key=key)
            stream.add(doc_id, None, None, key=key)  # the tombstone that follows a delete
            stream.deletes += 1
            continue
        if roll < 0.30 and row_id in rows:
            row = {**rows[row_id], "lang": rng.choice(["en", "de", "fr"]), "n": n}  # metadata only
        else:
            long = rng.random() < 0.06
            body = " ".join(rng.choice(SENTENCES) for _ in range(rng.randint(25, 50) if long else 1))
            stream.long_documents += long
            row = {"id": row_id, "title": f"Ticket {rng.randrange(400)}", "body": body, "lang": "en", "n": n}
        op = "u" if row_id in rows else rng.choice(["c", "r"])
        change = {"before": rows.get(row_id) if op == "u" else None, "after": row, "op": op, "source": source,
                  "ts_ms": source["ts_ms"]}
        rows[row_id] = row
        stream.add(doc_id, _envelope(rng, change), {"text": f"{row['title']}\n\n{row['body']}",
                                                    "metadata": {"lang": row["lang"], "n": row["n"]}}, key=key)
    return stream


def _envelope(rng: random.Random, change: dict[str, Any]) -> bytes:
    """The JSON converter's two shapes: `schemas.enable` true wraps the change in schema and payload."""
    if rng.random() < 0.5:
        return orjson.dumps({"schema": {"type": "struct", "name": "db.public.docs.Envelope", "optional": False}, "payload": change})
    return orjson.dumps(change)


async def check_store(sink: Any, stream: Stream, embedder: Any) -> dict[str, int]:
    """Per id: exactly its last event's chunks, metadata and vectors; deleted ids hold nothing."""
    by_id: dict[str, list[Any]] = {}
    for point in await sink.points():
        by_id.setdefault(point.payload["id"], []).append(point)
    stale, resurrected, chunked = [], [], 0
    first_chunks: list[tuple[str, np.ndarray]] = []
    for doc_id, body in stream.last.items():
        points = sorted(by_id.get(doc_id, []), key=lambda p: p.payload["chunk_index"])
        if body is None:
            if points:
                resurrected.append(doc_id)
            continue
        count = points[0].payload["chunk_count"] if points else 0
        fine = (
            bool(points)
            and [p.payload["chunk_index"] for p in points] == list(range(count))
            and all(p.payload["chunk_count"] == count and p.payload["metadata"] == body["metadata"] for p in points)
            and document_text([p.payload for p in points]) == (body["text"] if count == 1 else normalize_text(body["text"]))
        )
        if not fine:
            stale.append(doc_id)
            continue
        chunked += count > 1
        first_chunks.append((points[0].payload["text"], points[0].vector))
    if first_chunks:
        expected = embedder.embed([normalize_text(text) for text, _ in first_chunks]).vectors
        for (text, vector), want in zip(first_chunks, expected):
            assert float(np.dot(vector, want)) > 0.999, f"the vector of {text[:40]!r} is not its text's"
    assert not stale, f"{len(stale)} ids hold something other than their last event: {stale[:5]}"
    assert not resurrected, f"{len(resurrected)} deleted ids hold points: {resurrected[:5]}"
    return {"ids": len(stream.last), "stale": 0, "resurrected": 0, "chunked": chunked,
            "deleted": sum(body is None for body in stream.last.values())}


async def check_last_results(settings: Any, stream: Stream, *, expect: int) -> None:
    """The last result event of every id (in offset order) is that of its last event."""
    results = await read_topic(settings, settings.output_topic, expect=expect, timeout=120)
    last: dict[str, dict[str, Any]] = {}
    for record in sorted(results, key=lambda r: (r.partition, r.offset)):
        body = orjson.loads(record.value)
        last[body["id"]] = body
    for doc_id, body in stream.last.items():
        got = last[doc_id]
        if body is None:
            assert got["status"] == "deleted", (doc_id, got)
        else:
            assert got["status"] == "ok" and got["chunks"] >= 1, (doc_id, got)


def _slow_redis_cache(settings: Any, seed: int) -> SlowCache:
    return SlowCache(make_cache(settings), max_delay_seconds=0.03, seed=seed)


PIPELINED = dict(batch_min_messages=4, batch_max_messages=12, batch_min_wait_ms=5.0, batch_max_wait_ms=30.0,
                 max_in_flight_batches=4, lag_low=10, lag_high=200)


async def test_random_stream_with_batches_racing_mirrors_the_last_events(services, embedder):
    rng = random.Random(11)
    stream = random_stream(rng, events=1500, ids=50)
    settings = await make_settings(services, partitions=3, **PIPELINED)
    sink = make_sink(settings)
    await produce(settings, stream.values, keys=stream.keys)
    most_in_flight = 0

    def track() -> None:
        nonlocal most_in_flight
        most_in_flight = max(most_in_flight, worker.in_flight_batches)

    worker_box: dict[str, Any] = {}
    observer = WorkerObserver(on_fetch_round=lambda: track() if worker_box else None)
    async with running_worker(settings, embedder, sink=sink, cache=_slow_redis_cache(settings, 1), observer=observer) as worker:
        worker_box["w"] = worker
        await until(lambda: worker.stats.processed + worker.stats.dead_letters >= len(stream.values),
                         timeout=300, what="the stream to be processed")
        await until(lambda: sum(worker.lag_records().values()) == 0, timeout=60, what="everything committed")
    assert worker.stats.dead_letters == 0
    assert most_in_flight >= 3, f"at most {most_in_flight} batches were in flight: the race was not exercised"
    report = await check_store(sink, stream, embedder)
    await check_last_results(settings, stream, expect=len(stream.values))
    print(f"\nmirror: {len(stream.values)} events, {report['ids']} ids, {stream.deletes} deletes, "
          f"{stream.long_documents} long documents ({report['chunked']} ids end chunked), up to {most_in_flight} batches "
          f"in flight, 0 kills, stale versions 0, resurrected deletes 0")


async def test_random_stream_under_sigkills_mirrors_the_last_events(services, embedder, tmp_path):
    kills = 5
    rng = random.Random(23)
    stream = random_stream(rng, events=2000, ids=50)
    settings = await make_settings(services, partitions=3)
    await produce(settings, stream.values, keys=stream.keys)
    redis = urlparse(settings.redis_url)
    store, log = tmp_path / "qdrant", tmp_path / "worker.log"
    async with LatencyProxy(redis.hostname or "127.0.0.1", redis.port or 6379, max_delay_seconds=0.005, seed=3) as proxy:
        env = worker_env(settings, store, EMBEDWORKER_REDIS_URL=proxy.url,
                         **{f"EMBEDWORKER_{k.upper()}": str(v) for k, v in PIPELINED.items()})
        total = len(stream.values)
        committed_at = await run_with_kills(settings, env, log, total=total, kills=kills, rng=rng)
    report = await check_stored_and_published(settings, store, stream, embedder)
    print(f"\nmirror under kills: {total} events, {report['ids']} ids, {stream.deletes} deletes, {stream.long_documents} "
          f"long documents ({report['chunked']} ids end chunked), {kills} SIGKILLs (committed at {committed_at}), "
          f"stale versions 0, resurrected deletes 0")


async def test_debezium_changes_under_sigkills_leave_the_table_as_it_ends(services, embedder, tmp_path):
    """The mirror property for Debezium input: each row's last state, deleted rows gone, across kills."""
    kills = 3
    rng = random.Random(41)
    stream = debezium_stream(rng, events=900, ids=40)
    settings = await make_settings(services, partitions=3)
    await produce(settings, stream.values, keys=stream.keys)
    store, log = tmp_path / "qdrant", tmp_path / "worker.log"
    env = worker_env(settings, store, **DEBEZIUM_MAPPING, **{f"EMBEDWORKER_{k.upper()}": str(v) for k, v in PIPELINED.items()})
    total = len(stream.values)
    await run_with_kills(settings, env, log, total=total, kills=kills, rng=rng)
    assert "dead letter at" not in log.read_text(), "a Debezium event was refused"
    report = await check_stored_and_published(settings, store, stream, embedder)
    assert report["deleted"] > 0 and report["chunked"] > 0
    print(f"\ndebezium mirror under kills: {total} records, {report['ids']} rows, {stream.deletes} deletes (+ tombstones), "
          f"{report['chunked']} rows chunked, {kills} SIGKILLs, stale 0, resurrected 0")


async def check_stored_and_published(settings: Any, store: Any, stream: Stream, embedder: Any) -> dict[str, int]:
    """`check_store` on the store the worker processes left, then `check_last_results`."""
    sink = open_store(settings, store)
    try:
        report = await check_store(sink, stream, embedder)
    finally:
        await sink.close()
    await check_last_results(settings, stream, expect=len(stream.values))
    return report


async def run_with_kills(settings: Any, env: dict[str, str], log: Any, *, total: int, kills: int, rng: random.Random) -> list[int]:
    """Worker processes SIGKILLed `kills` times at random progress, then one run to the end (SIGTERM); the
    committed total after each kill."""
    committed_at = []
    for killed in range(kills):
        process = start_worker(env, log)
        before = sum((await committed_offsets(settings, 3)).values())
        room = max(1, (total - before) // (kills - killed + 1))
        target = min(total - 1, before + rng.randint(max(1, room // 3), room))
        await until(lambda: process.poll() is not None or _committed_sync_n(settings, 3) >= target,
                    timeout=180, what="progress before the kill", interval=0.3)
        assert process.poll() is None, log.read_text()[-3000:]
        process.send_signal(signal.SIGKILL)
        process.wait()
        committed_at.append(sum((await committed_offsets(settings, 3)).values()))
    starts = log.read_text().count("loading model")
    process = start_worker(env, log)
    try:
        await until(lambda: log.read_text().count("loading model") > starts, timeout=60, what="the final worker to start")
        await until(lambda: _committed_sync_n(settings, 3) >= total, timeout=300, what="the final worker to finish", interval=0.3)
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0, log.read_text()[-3000:]
    return committed_at


def _committed_sync_n(settings: Any, partitions: int) -> int:
    import threading

    result: list[dict[int, int]] = []
    thread = threading.Thread(target=lambda: result.append(asyncio.run(committed_offsets(settings, partitions))))
    thread.start()
    thread.join()
    return sum(result[0].values())


async def test_rebalance_while_the_sink_stalls_leaves_no_stale_version(services, embedder):
    """A keeps failing to write past its revoke wait while B joins; A's old batches must never land or publish."""
    ids = [f"doc-{i}" for i in range(24)]
    settings = await make_settings(services, partitions=4, shutdown_timeout_seconds=2.0, batch_min_messages=4, batch_max_messages=8,
                                   max_in_flight_batches=2)
    shared = make_sink(settings)
    stalled = FailingSink(shared)
    stalled.failing = True
    revoked_at: dict[int, float] = {}
    published: list[tuple[float, int]] = []
    observer_a = WorkerObserver(
        on_revoked=lambda tps: revoked_at.update({tp.partition: time.monotonic() for tp in tps}),
        on_published=lambda items: published.extend((time.monotonic(), tp.partition) for tp, _ in items),
    )
    v1 = [orjson.dumps({"id": d, "text": f"first version of {d}", "metadata": {"v": 1}}) for d in ids]
    v2 = [orjson.dumps({"id": d, "text": f"second version of {d}", "metadata": {"v": 2}}) for d in ids]
    keys = [d.encode() for d in ids]
    async with running_worker(settings, embedder, sink=stalled, observer=observer_a) as a:
        await produce(settings, v1, keys=keys)
        await until(lambda: stalled.failed_calls >= 2, timeout=60, what="A's writes to fail")
        async with running_worker(settings, embedder, sink=shared) as b:
            await until(lambda: len(b.assigned()) > 0 and len(a.assigned()) > 0, timeout=60, what="B to join")
            moved = {tp.partition for tp in b.assigned()}
            await produce(settings, v2, keys=keys)
            await until(lambda: sum(b.lag_records().values()) == 0 and b.stats.processed > 0,
                             timeout=120, what="B to process its partitions")
            stalled.failing = False  # A's sink heals: its fenced batches must drop their writes
            await until(lambda: sum(a.lag_records().values()) == 0 and a.in_flight_batches == 0,
                             timeout=120, what="A to finish what it still owns")
    late = [(t, p) for t, p in published if p in moved and t > revoked_at.get(p, float("inf"))]
    assert not late, f"A published {len(late)} results of partitions it had lost"
    points = {p.payload["id"]: p.payload for p in await shared.points(with_vectors=False)}
    stale = [d for d in ids if points.get(d, {}).get("metadata") != {"v": 2}]
    assert not stale, f"stale versions survived the rebalance: {stale}"
    print(f"\nrebalance with a stalled sink: {len(ids) * 2} events, {len(ids)} ids, partitions moved {sorted(moved)}, "
          f"A's failed writes {stalled.failed_calls}, stale versions 0, late publishes of revoked partitions 0")
