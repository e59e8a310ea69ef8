"""The Faust runtime end to end: a real `faust ... worker` process, broker, Redis, Qdrant, model.

The worker runs as a subprocess exactly as users start it
(`python -m faust -A streams.faust_app worker --without-web`), configured through
EMBEDWORKER_* variables. With an embedded Qdrant (no QDRANT_URL) the store is a temp
directory, opened here only after the worker has exited (one process per path).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import orjson
import pytest

from schemas import point_id
from streams.config import OPTIONS, Settings
from support import TEXTS, committed_offsets, event, make_settings, make_sink, produce, read_topic, until
from support import retrieve

pytestmark = pytest.mark.integration


MALFORMED: list[bytes | None] = [b"not json", b"[1, 2]", b'{"id": "x"}', b"\xff\xfe", b'{"id": "x", "op": "merge"}']
MALFORMED_KINDS = ["invalid_json", "not_an_object", "missing_text", "invalid_utf8", "invalid_op"]


def worker_env(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBEDWORKER_")}
    for option in OPTIONS:
        value = getattr(settings, option.name)
        env[option.env] = str(value).lower() if isinstance(value, bool) else str(value)
    env["HF_HUB_OFFLINE"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def log_tail(path: Path, chars: int = 6000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


async def stop_process(process: asyncio.subprocess.Process, timeout: float = 40.0) -> int:
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), timeout=timeout)
        except asyncio.TimeoutError:
            process.kill()
            await process.wait()
            raise AssertionError(f"faust worker ignored SIGTERM for {timeout}s")
    return process.returncode  # type: ignore[return-value]


async def test_faust_worker_end_to_end(services, embedder, tmp_path):
    started = time.monotonic()
    overrides: dict = {"batch_min_messages": 8, "batch_max_messages": 16, "batch_max_wait_ms": 100.0, "device": "cpu", "log_level": "INFO"}
    if not services.qdrant_url:
        overrides["qdrant_path"] = str(tmp_path / "qdrant")
    settings = await make_settings(services, partitions=2, **overrides)

    # Texts of their own (the Redis cache outlives tests): each appears 6 times.
    marker = uuid.uuid4().hex[:8]
    texts = [f"{text} [{marker}]" for text in TEXTS]
    count = 30
    valid = [event(f"id-{i}", texts[i % len(texts)], n=i) for i in range(count)]
    values = valid + MALFORMED + [None]  # the last: a tombstone, deleting the document named by its key
    keys = [f"k{i}".encode() for i in range(len(values))]
    await produce(settings, values, keys=keys)

    log_path = tmp_path / "worker.log"
    with open(log_path, "wb") as log_file:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "faust", "-A", "streams.faust_app", "worker", "--without-web", "-l", "info",
            cwd=tmp_path, env=worker_env(settings), stdout=log_file, stderr=asyncio.subprocess.STDOUT,
        )
    try:
        try:
            results = await read_topic(settings, settings.output_topic, expect=count + 1, timeout=60)
            dead = await read_topic(settings, settings.dlq_topic, expect=len(MALFORMED), timeout=20)

            async def all_committed() -> bool:
                if process.returncode is not None:
                    raise AssertionError(f"faust worker exited with {process.returncode}")
                return sum((await committed_offsets(settings, 2)).values()) == len(values)

            await until(all_committed, timeout=20, what="committed offsets covering all input", interval=0.3)
        finally:
            code = await stop_process(process)
        assert code == 0, f"faust worker exited with {code}"
    except BaseException:
        print(f"---- faust worker log ----\n{log_tail(log_path)}", file=sys.stderr)
        raise
    processed_at = time.monotonic()

    # One result per valid input, keyed by the event id.
    bodies = [orjson.loads(record.value) for record in results]
    deleted = [b for b in bodies if b["status"] == "deleted"]
    assert deleted == [{"id": f"k{len(values) - 1}", "status": "deleted", "collection": settings.collection, "chunks": 0}]
    results = [r for r, b in zip(results, bodies) if b["status"] != "deleted"]
    bodies = [b for b in bodies if b["status"] != "deleted"]
    assert len(results) == count
    assert sorted(b["id"] for b in bodies) == sorted(f"id-{i}" for i in range(count))
    for record, body in zip(results, bodies):
        assert record.key == body["id"].encode()
        assert body["status"] == "ok" and body["dim"] == embedder.dim and body["collection"] == settings.collection
        assert body["point_id"] == point_id(body["id"]) and body["truncated"] is False
    # Duplicate texts are reported as cached: exactly one embedding per distinct text.
    by_id = {body["id"]: body for body in bodies}
    for index, text in enumerate(texts):
        group = [by_id[f"id-{i}"] for i in range(index, count, len(texts))]
        assert sum(not body["cached"] for body in group) == 1, (text, group)
        assert len({body["content_hash"] for body in group}) == 1

    # One dead letter per malformed input, with the main runtime's envelope.
    assert len(dead) == len(MALFORMED)
    letters = [orjson.loads(record.value) for record in dead]
    assert sorted(letter["error"]["type"] for letter in letters) == sorted(MALFORMED_KINDS)
    inputs = await read_topic(settings, settings.input_topic, expect=len(values), timeout=20)
    key_at = {(record.partition, record.offset): record.key for record in inputs}
    for record, letter in zip(dead, letters):
        index = keys.index(record.key)  # dead letters keep the original key
        source = letter["source"]
        assert source["topic"] == settings.input_topic
        assert key_at[(source["partition"], source["offset"])] == record.key
        original = values[index]
        if original is None:
            assert letter["payload"] is None and letter["payload_encoding"] == "none"
        elif letter["payload_encoding"] == "utf-8":
            assert letter["payload"].encode() == original
        else:
            assert letter["payload_encoding"] == "base64"

    # The group's committed offsets cover all input (checked again after the shutdown).
    assert sum((await committed_offsets(settings, 2)).values()) == len(values)

    # Exactly one point per valid id, with the right vector: the store is free now.
    sink = make_sink(settings)
    try:
        assert await sink.count() == count
        points = await retrieve(sink, [point_id(f"id-{i}") for i in range(count)])
        expected = embedder.embed(texts).vectors
        for i in range(count):
            vector, payload = points[point_id(f"id-{i}")]
            assert payload["id"] == f"id-{i}" and payload["metadata"] == {"n": i}
            assert float(np.dot(vector, expected[i % len(texts)])) > 0.999
    finally:
        await sink.close()
    print(f"faust e2e: processed and stopped in {processed_at - started:.1f}s, total {time.monotonic() - started:.1f}s")


_ABANDON_SCRIPT = r"""
import asyncio, json, sys
from types import SimpleNamespace
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/tests"]
from doubles import WordEmbedder
from processors.pipeline import Pipeline
from processors.sink import QdrantSink
from streams.config import load_settings
from streams.faust_app import create_app
from streams.steps.publish import Publisher
from support import event


class Message:
    def __init__(self, offset, value):
        self.topic, self.partition, self.offset, self.key, self.value = "in", 0, offset, None, value
        self.headers = [("traceparent", b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
                        ("embedworker-replay-count", b"2"), ("x-not-named", b"stays home"), ("tracestate", b"k=\x1b" * 400)]
        self.refcount = 1  # take_events' own reference, released (acked) in its `finally`

    def incref(self):
        self.refcount += 1

    def decref(self):
        self.refcount -= 1


class Broken(Pipeline):
    async def process(self, events, **kwargs):
        raise RuntimeError("the batch fails midway")


async def arm(fails):
    settings = load_settings({"collection": "faust-unit", "input_topic": "in", "output_topic": "out", "dlq_topic": "dlq"}, environ={})
    sink = QdrantSink(collection="faust-unit")
    runtime = create_app(settings, embedder=WordEmbedder(), sink=sink, cache=None).embed_runtime
    sent = []

    async def send(topic, key, value, headers=()):
        sent.append([name for name, _ in headers])
        done = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    runtime.pipeline = (Broken if fails else Pipeline)(embedder=runtime.embedder, sink=sink)
    await runtime.pipeline.start()
    runtime.publisher = Publisher(send=send)
    messages = [Message(i, event(f"id-{i}", f"text {i}")) for i in range(4)]
    raised = False
    try:
        await runtime.handle([SimpleNamespace(message=m) for m in messages])
    except RuntimeError:
        raised = True
    for m in messages:
        m.decref()  # take_events acknowledges in its `finally` either way
    return {"raised": raised, "refcounts": [m.refcount for m in messages], "sent": len(sent),
            "headers": sorted({tuple(h) for h in sent})}


print(json.dumps({"fails": asyncio.run(arm(True)), "works": asyncio.run(arm(False))}))
"""


def test_faust_batch_abandoned_midway_stays_held_so_faust_cannot_commit_it():
    """Faust commits a message once its references reach 0; take_events drops its own in a
    `finally` even when the batch fails, so the runtime's extra reference is what keeps an
    abandoned batch uncommitted (replayed by the next owner). Stand-in messages, no broker; in a
    process of its own, so Faust and its service library are never imported into the test
    process (the in-process memory-budget test measures this process's RSS)."""
    import subprocess

    root = str(Path(__file__).resolve().parents[2])
    done = subprocess.run([sys.executable, "-c", _ABANDON_SCRIPT, root], capture_output=True, text=True, timeout=120, cwd=root,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    result = orjson.loads(done.stdout.strip().splitlines()[-1])
    assert result["fails"] == {"raised": True, "refcounts": [1, 1, 1, 1], "sent": 0, "headers": []}  # held: never committed
    assert result["works"] == {  # released once acknowledged; trace context and replay count travel, as in the main runtime
        "raised": False, "refcounts": [0, 0, 0, 0], "sent": 4, "headers": [["traceparent", "embedworker-replay-count"]],
    }
