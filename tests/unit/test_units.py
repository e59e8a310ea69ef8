"""Unit tests of logic without I/O: schemas, keys, ids, batching, offsets, flow, config."""

from __future__ import annotations

import asyncio
import base64
import uuid

import numpy as np
import orjson
import pytest
from prometheus_client import CollectorRegistry

from processors.cache import decode_vector, encode_vector
from processors import torch_thread
from processors.embedder import estimate_tokens, plan_sub_batches
from schemas import (
    POINT_NAMESPACE,
    InvalidEvent,
    Limits,
    ResultEvent,
    SourcePosition,
    content_hash,
    decode_input,
    encode_dead_letter,
    point_id,
)
from streams.backends import BrokerError, TopicPartition
from streams.batching import BatchPolicy, Batcher
from streams.commits import Commits
from streams.config import ConfigError, load_settings
from streams.fencing import Fencing
from streams.flow import FlowController, FlowSignals, Watermarks
from streams.metrics import Metrics
from streams.offsets import OffsetTracker

# ---- schemas -------------------------------------------------------------------------------


def test_decode_valid_event_with_metadata():
    event = decode_input(b'{"id": "a1", "text": "hello world", "metadata": {"lang": "en"}}')
    assert (event.id, event.text, event.metadata) == ("a1", "hello world", {"lang": "en"})


def test_decode_valid_event_without_metadata():
    assert decode_input(b'{"id": "a1", "text": "hi"}').metadata == {}


@pytest.mark.parametrize(
    "raw, kind",
    [
        (None, "missing_id"),  # a tombstone without a key names no document
        (b'{"id": "x", "op": "merge"}', "invalid_op"),
        (b"", "invalid_json"),
        (b"not json", "invalid_json"),
        (b"\xff\xfe{}", "invalid_utf8"),
        (b'"a string"', "not_an_object"),
        (b"[1, 2]", "not_an_object"),
        (b'{"text": "t"}', "missing_id"),
        (b'{"id": "x"}', "missing_text"),
        (b'{"id": "", "text": "t"}', "empty_id"),
        (b'{"id": "x", "text": "   "}', "empty_text"),
        (b'{"id": 5, "text": "t"}', "invalid_id"),
        (b'{"id": "x", "text": 5}', "invalid_text"),
        (b'{"id": "x", "text": ["t"]}', "invalid_text"),
        (b'{"id": "x", "text": "a\\u0000b"}', "invalid_text"),
        (b'{"id": "x", "text": "\\ud800"}', "invalid_json"),
        (b'{"id": "x", "text": "t", "metadata": [1]}', "invalid_metadata"),
        (b'{"id": "x", "text": "t", "n": 1' + b"0" * 400 + b"}", "invalid_json"),
    ],
)
def test_decode_rejects_bad_input_with_a_precise_reason(raw, kind):
    with pytest.raises(InvalidEvent) as caught:
        decode_input(raw)
    assert caught.value.kind == kind


def test_decode_enforces_size_limits_before_and_after_parsing():
    limits = Limits(max_message_bytes=100, max_text_bytes=10, max_id_chars=3, max_metadata_bytes=20, max_depth=3)
    cases = {
        b'{"id": "x", "text": "' + b"a" * 200 + b'"}': "message_too_large",
        b'{"id": "x", "text": "' + b"a" * 11 + b'"}': "text_too_large",
        b'{"id": "abcd", "text": "t"}': "id_too_long",
        b'{"id": "x", "text": "t", "metadata": {"k": "' + b"v" * 30 + b'"}}': "metadata_too_large",
        b'{"id": "x", "text": "t", "metadata": {"a": {"b": {"c": 1}}}}': "too_deep",
    }
    for raw, kind in cases.items():
        with pytest.raises(InvalidEvent) as caught:
            decode_input(raw, limits)
        assert caught.value.kind == kind, raw


def test_deeply_nested_json_is_rejected_not_crashing():
    raw = b'{"id": "x", "text": "t", "metadata": ' + b'{"a": ' * 5000 + b"1" + b"}" * 5000 + b"}"
    with pytest.raises(InvalidEvent):
        decode_input(raw)


def test_point_id_is_uuid5_of_the_event_id_under_the_documented_namespace():
    assert point_id("doc-1") == str(uuid.uuid5(POINT_NAMESPACE, "doc-1"))
    assert point_id("doc-1") == point_id("doc-1") != point_id("doc-2")


def test_content_hash_depends_on_model_and_normalized_text():
    assert content_hash("m", "  caf\u00e9 ") == content_hash("m", "cafe\u0301")  # NFC + outer whitespace
    assert content_hash("m", "text") != content_hash("other-model", "text")
    assert content_hash("m", "text") != content_hash("m", "Text")
    assert len(content_hash("m", "x")) == 64


def test_result_event_contract():
    body = orjson.loads(
        ResultEvent(id="a", point_id=point_id("a"), collection="c", model="m", dim=3, cached=True, truncated=False, content_hash="h").encode()
    )
    assert body == {"id": "a", "point_id": point_id("a"), "collection": "c", "model": "m", "dim": 3, "cached": True,
                    "truncated": False, "content_hash": "h", "status": "ok", "chunks": 1}


def test_dead_letter_keeps_utf8_payload_as_text_and_binary_as_base64():
    source = SourcePosition(topic="t", partition=1, offset=7)
    text = orjson.loads(encode_dead_letter(kind="invalid_json", message="m", source=source, payload=b"oops"))
    assert text == {"error": {"type": "invalid_json", "message": "m"}, "source": {"topic": "t", "partition": 1, "offset": 7},
                    "payload": "oops", "payload_encoding": "utf-8"}
    binary = orjson.loads(encode_dead_letter(kind="invalid_utf8", message="m", source=source, payload=b"\xff\x00"))
    assert binary["payload_encoding"] == "base64" and base64.b64decode(binary["payload"]) == b"\xff\x00"
    null = orjson.loads(encode_dead_letter(kind="empty_message", message="m", source=source, payload=None))
    assert null["payload"] is None


# ---- cache values --------------------------------------------------------------------------


def test_vector_round_trips_as_little_endian_bytes():
    vector = np.random.default_rng(1).standard_normal(384).astype(np.float32)
    raw = encode_vector(vector)
    assert len(raw) == 384 * 4 and raw == vector.astype("<f4").tobytes()
    assert np.array_equal(decode_vector(raw, 384), vector)
    half = decode_vector(encode_vector(vector, "float16"), 384, "float16")
    assert half is not None and np.allclose(half, vector, atol=1e-2)
    assert decode_vector(raw[:-4], 384) is None  # wrong size: a miss, not garbage


# ---- sub-batch planning --------------------------------------------------------------------


def test_sub_batches_cover_every_index_once_and_respect_limits():
    counts = [5, 250, 12, 12, 80, 7, 256, 30] * 20
    plan = plan_sub_batches(counts, token_budget=2048, max_batch=32)
    flat = sorted(i for batch in plan for i in batch)
    assert flat == list(range(len(counts)))
    for batch in plan:
        assert len(batch) <= 32
        assert len(batch) == 1 or max(counts[i] for i in batch) * len(batch) <= 2048


def test_sub_batches_keep_long_texts_away_from_short_ones():
    counts = [10] * 60 + [250] * 4
    plan = plan_sub_batches(counts, token_budget=8192, max_batch=128)
    for batch in plan:
        lengths = {counts[i] for i in batch}
        assert len(lengths) == 1, "a long text would pad the short ones"


def _exhaustive_plan_cost(counts: list[int], token_budget: int, max_batch: int, overhead: int) -> float:
    """Every cut tried (the planner before it skipped cuts between equal counts): the cheapest cost."""
    lengths = sorted(max(1, c) for c in counts)
    best = [0.0] + [float("inf")] * len(lengths)
    for end in range(1, len(lengths) + 1):
        for start in range(end - 1, max(-1, end - 1 - max_batch), -1):
            if end - start > 1 and lengths[end - 1] * (end - start) > token_budget:
                break
            best[end] = min(best[end], best[start] + overhead + lengths[end - 1] * (end - start))
    return best[-1]


def test_sub_batches_cost_what_trying_every_cut_costs():
    import random

    rng = random.Random(7)
    for _ in range(400):
        counts = [rng.choice([rng.randint(0, 20), rng.randint(1, 512)]) for _ in range(rng.randint(0, 200))]
        budget, max_batch, overhead = rng.choice([64, 2048, 8192]), rng.choice([1, 7, 32, 128]), rng.choice([0, 48, 500])
        plan = plan_sub_batches(counts, token_budget=budget, max_batch=max_batch, call_overhead_tokens=overhead)
        assert sorted(i for batch in plan for i in batch) == list(range(len(counts)))
        longest = [max(max(1, counts[i]) for i in batch) for batch in plan]
        assert all(len(b) <= max_batch and (len(b) == 1 or top * len(b) <= budget) for b, top in zip(plan, longest))
        cost = sum(overhead + top * len(b) for b, top in zip(plan, longest))
        assert cost == _exhaustive_plan_cost(counts, budget, max_batch, overhead)


def test_token_estimate_grows_with_length():
    assert estimate_tokens("a" * 400) > estimate_tokens("a" * 40) > 0


# ---- the torch thread ----------------------------------------------------------------------


def test_torch_work_from_any_thread_runs_on_one_thread_and_nested_calls_do_not_deadlock():
    import threading
    from concurrent.futures import ThreadPoolExecutor

    def where() -> int:
        return threading.get_ident()

    def nested() -> tuple[int, int]:
        return threading.get_ident(), torch_thread.run(where)

    with ThreadPoolExecutor(max_workers=4) as callers:
        idents = set(callers.map(lambda _: torch_thread.run(where), range(16)))
    outer, inner = torch_thread.run(nested)
    assert len(idents) == 1 and idents == {outer} == {inner}
    assert outer != threading.get_ident()


# ---- batching ------------------------------------------------------------------------------


def test_batch_closes_on_count_tokens_or_wait():
    policy = BatchPolicy(min_messages=3, max_messages=3, min_tokens=100, max_tokens=100, min_wait_seconds=1.0, max_wait_seconds=1.0)
    batcher: Batcher[int] = Batcher(policy)
    batcher.add(1, 10, now=0.0)
    batcher.add(2, 10, now=0.1)
    assert not batcher.ready(0.5)
    assert batcher.ready(1.0)  # max wait
    batcher.add(3, 10, now=0.2)
    assert batcher.ready(0.3)  # count
    assert batcher.take(0.3) == [1, 2, 3] and len(batcher) == 0
    batcher.add(4, 60, now=1.0)
    batcher.add(5, 60, now=1.0)
    assert batcher.ready(1.0)  # token budget
    assert batcher.take(1.0) == [4]  # the budget caps the batch
    assert batcher.take(1.0) == [5]


def test_caught_up_batch_closes_without_waiting_and_only_the_open_one():
    policy = BatchPolicy(min_messages=2, max_messages=2, min_tokens=100, max_tokens=100, min_wait_seconds=1.0, max_wait_seconds=1.0)
    batcher: Batcher[int] = Batcher(policy)
    batcher.close_now()  # nothing open: no effect on what comes later
    batcher.add(1, 10, now=0.0)
    assert not batcher.ready(0.0) and batcher.seconds_until_due(0.0) == 1.0
    batcher.add(2, 10, now=0.0)
    batcher.add(3, 10, now=0.0)
    batcher.close_now()
    assert batcher.ready(0.0) and batcher.seconds_until_due(0.0) == 0.0
    assert batcher.take(0.0) == [1, 2]  # the count limit still holds
    assert batcher.ready(0.0)  # the rest arrived with them: still due
    assert batcher.take(0.0) == [3]
    batcher.add(4, 10, now=0.5)
    assert not batcher.ready(0.5)  # a new batch waits again


def test_adaptive_policy_favours_latency_at_low_lag_and_throughput_at_high_lag():
    policy = BatchPolicy(min_messages=16, max_messages=256, min_tokens=1000, max_tokens=9000, min_wait_seconds=0.005, max_wait_seconds=0.2, low_lag=100, high_lag=1100)
    assert policy.targets(0) == (16, 1000, 0.005)
    assert policy.targets(5000) == (256, 9000, 0.2)
    messages, tokens, wait = policy.targets(600)
    assert 16 < messages < 256 and 1000 < tokens < 9000 and 0.005 < wait < 0.2


def test_batcher_removes_items_of_revoked_partitions():
    batcher: Batcher[tuple[str, int]] = Batcher(BatchPolicy())
    for item in [("a", 1), ("b", 2), ("a", 3)]:
        batcher.add(item, 5, now=0)
    assert batcher.remove(lambda item: item[0] == "a") == [("a", 1), ("a", 3)]
    assert batcher.drain() == [("b", 2)]


# ---- offsets -------------------------------------------------------------------------------


def test_commit_point_never_passes_an_unfinished_message():
    tracker = OffsetTracker()
    tracker.set_committed("p0", 10)
    for offset in range(10, 15):
        assert tracker.register("p0", offset, timestamp=offset)
    tracker.finish("p0", 12)
    tracker.finish("p0", 14)
    assert tracker.to_commit() == {}
    tracker.finish("p0", 10)
    assert tracker.to_commit() == {"p0": 11}
    tracker.finish("p0", 11)
    assert tracker.to_commit() == {"p0": 13}
    assert tracker.oldest_pending_timestamp("p0") == 13
    tracker.mark_committed({"p0": 13})
    assert tracker.to_commit() == {}
    tracker.finish("p0", 13)
    assert tracker.to_commit() == {"p0": 15} and tracker.pending_count() == 0


def test_refetched_or_already_finished_offsets_are_not_tracked_twice():
    tracker = OffsetTracker()
    tracker.set_committed("p", 0)
    assert tracker.register("p", 0) and tracker.register("p", 1)
    assert not tracker.register("p", 1)
    tracker.finish("p", 0)
    assert not tracker.register("p", 0)  # finished, not yet committed


def test_forget_drops_revoked_partitions_and_ignores_late_finishes():
    tracker = OffsetTracker()
    tracker.register("p", 5)
    tracker.forget(["p"])
    tracker.finish("p", 5)
    assert tracker.to_commit() == {} and tracker.partitions() == []


# ---- flow control --------------------------------------------------------------------------


def _signals(**values):
    base = dict(buffered_messages=0, buffered_bytes=0, in_flight_batches=0, rss_bytes=0, sink_healthy=True)
    base.update(values)
    return FlowSignals(**base)


def test_flow_pauses_at_high_mark_and_resumes_only_below_low_mark():
    flow = FlowController(
        buffered_messages=Watermarks(high=100, low=50),
        buffered_bytes=Watermarks(high=1000, low=500),
        in_flight_batches=Watermarks(high=4, low=2),
        memory_bytes=Watermarks(high=900, low=800),
    )
    assert not flow.update(_signals(buffered_messages=99))
    assert flow.update(_signals(buffered_messages=100)) == {"buffered_messages"}
    assert flow.update(_signals(buffered_messages=60)) == {"buffered_messages"}  # hysteresis
    assert not flow.update(_signals(buffered_messages=50))
    assert flow.update(_signals(rss_bytes=950, buffered_messages=5, sink_healthy=False)) == {"memory", "sink"}
    assert flow.update(_signals(rss_bytes=850, buffered_messages=5)) == {"memory"}
    assert flow.update(_signals(rss_bytes=700, buffered_messages=5)) == set()


def test_memory_signal_is_off_without_a_budget():
    flow = FlowController(
        buffered_messages=Watermarks(high=10, low=5), buffered_bytes=Watermarks(high=10, low=5),
        in_flight_batches=Watermarks(high=10, low=5), memory_bytes=None,
    )
    assert not flow.update(_signals(rss_bytes=10**12))


# ---- configuration -------------------------------------------------------------------------


def test_settings_from_environment_and_flags():
    settings = load_settings({"group_id": "from-flag"}, environ={"EMBEDWORKER_INPUT_TOPIC": "in", "EMBEDWORKER_GROUP_ID": "env", "EMBEDWORKER_METRICS_PORT": "9200"})
    assert (settings.input_topic, settings.group_id, settings.metrics_port) == ("in", "from-flag", 9200)
    defaults = load_settings(environ={})
    assert (defaults.input_topic, defaults.output_topic, defaults.dlq_topic, defaults.group_id, defaults.collection) == (
        "texts", "embeddings", "texts.dlq", "embedworker", "texts")
    assert (defaults.device, defaults.metrics_port) == ("auto", 9108)


@pytest.mark.parametrize(
    "environ, setting",
    [
        ({"EMBEDWORKER_METRICS_PORT": "http"}, "EMBEDWORKER_METRICS_PORT"),
        ({"EMBEDWORKER_METRICS_PORT": "70000"}, "EMBEDWORKER_METRICS_PORT"),
        ({"EMBEDWORKER_MAX_IN_FLIGHT_BATCHES": "0"}, "EMBEDWORKER_MAX_IN_FLIGHT_BATCHES"),
        ({"EMBEDWORKER_INPUT_TOPIC": " "}, "EMBEDWORKER_INPUT_TOPIC"),
        ({"EMBEDWORKER_STORE_TEXT": "maybe"}, "EMBEDWORKER_STORE_TEXT"),
        ({"EMBEDWORKER_QDRANT_URL": "qdrant:6333"}, "EMBEDWORKER_QDRANT_URL"),
        ({"EMBEDWORKER_REDIS_URL": "localhost:6379"}, "EMBEDWORKER_REDIS_URL"),
        ({"EMBEDWORKER_KAFKA_SECURITY_PROTOCOL": "TLS"}, "EMBEDWORKER_KAFKA_SECURITY_PROTOCOL"),
        ({"EMBEDWORKER_KAFKA_SECURITY_PROTOCOL": "SASL_SSL"}, "EMBEDWORKER_KAFKA_SASL_USERNAME"),
        ({"EMBEDWORKER_OUTPUT_TOPIC": "texts"}, "EMBEDWORKER_OUTPUT_TOPIC"),
        ({"EMBEDWORKER_PAYLOAD_INDEXES": "metadata.lang:keyword,metadata.ts:number"}, "EMBEDWORKER_PAYLOAD_INDEXES"),
        ({"EMBEDWORKER_LONG_TEXT": "cut"}, "EMBEDWORKER_LONG_TEXT"),
    ],
)
def test_bad_setting_names_itself(environ, setting):
    with pytest.raises(ConfigError) as caught:
        load_settings(environ=environ)
    assert caught.value.setting == setting
    assert setting in str(caught.value) and "\n" not in str(caught.value)


def test_memory_pause_releases_once_nothing_is_buffered():
    flow = FlowController(
        buffered_messages=Watermarks(high=10**6, low=1), buffered_bytes=Watermarks(high=10**9, low=1),
        in_flight_batches=Watermarks(high=10, low=5), memory_bytes=Watermarks(high=900, low=800),
    )
    assert flow.update(_signals(rss_bytes=950, buffered_messages=10)) == {"memory"}
    assert flow.update(_signals(rss_bytes=950, buffered_messages=3)) == {"memory"}
    assert flow.update(_signals(rss_bytes=950, buffered_messages=0)) == set()


def test_the_in_flight_band_widens_with_the_batch_rate_and_stops_short_of_the_message_buffer():
    from streams.backpressure import SHORTEST_PAUSE_SECONDS, Backpressure
    from streams.telemetry import RunStats

    settings = load_settings({"max_in_flight_batches": 3, "batch_max_messages": 256, "buffer_max_messages": 5000}, environ={})
    pressure = Backpressure(settings, metrics=Metrics(CollectorRegistry()), stats=RunStats())
    marks = lambda: pressure.flow.marks("in_flight_batches")  # noqa: E731
    assert (marks().high, marks().low) == (6, 3)
    for n in range(20):  # a batch every 62.5 ms: four batches in the shortest pause of 0.25 s
        pressure.batch_finished(now=n * 0.0625)
    assert SHORTEST_PAUSE_SECONDS == 0.25 and (marks().high, marks().low) == (6 + 4, 3)
    for n in range(40):  # a batch a second: one pipeline's depth is band enough
        pressure.batch_finished(now=10 + n)
    assert marks().high == 6
    for n in range(40):  # very fast: capped at 80% of the message buffer (15 batches of 256, less 6)
        pressure.batch_finished(now=100 + n * 0.001)
    assert marks().high == 6 + 9

    # The wider band holds a pause until the closed batches drain to one pipeline's depth.
    flow = pressure.flow
    assert flow.update(_signals(in_flight_batches=14)) == set()
    assert flow.update(_signals(in_flight_batches=15)) == {"in_flight_batches"}
    assert flow.update(_signals(in_flight_batches=4)) == {"in_flight_batches"}
    assert flow.update(_signals(in_flight_batches=3)) == set()


def test_dead_letter_payload_is_capped_with_its_size_and_hash():
    import hashlib

    source = SourcePosition(topic="t", partition=0, offset=1)
    for payload in (b"\x01" * 180_000, bytes(range(256)) * 3200, "é".encode() * 50_000):
        raw = encode_dead_letter(kind="k", message="m", source=source, payload=payload, max_payload_bytes=65_536)
        letter = orjson.loads(raw)
        assert len(raw) < 100_000  # fits any broker's default message size
        assert letter["payload_truncated"] is True and letter["payload_size"] == len(payload)
        assert letter["payload_sha256"] == hashlib.sha256(payload).hexdigest()
    small = orjson.loads(encode_dead_letter(kind="k", message="m", source=source, payload=b"ok"))
    assert small["payload"] == "ok" and "payload_truncated" not in small
    bare = orjson.loads(encode_dead_letter(kind="k", message="m", source=source, payload=b"ok", max_payload_bytes=0))
    assert bare["payload"] is None and bare["payload_size"] == 2


def test_tombstones_and_delete_events_decode_as_deletes():
    from schemas import InputEvent, decode_tombstone

    assert decode_input(None, key=b"doc-1") == InputEvent(id="doc-1", text="", op="delete")
    assert decode_input(b'{"id": "doc-1", "op": "delete"}').is_delete
    assert decode_input(b'{"id": "doc-1", "text": "t", "op": "upsert"}').text == "t"
    with pytest.raises(InvalidEvent) as caught:
        decode_tombstone(b"\xff")
    assert caught.value.kind == "invalid_id"


def test_repeated_aiokafka_lines_pass_once_a_minute():
    import logging

    from streams.cli import _RepeatFilter

    repeat = _RepeatFilter()

    def record(name: str, msg: str, at: float) -> logging.LogRecord:
        r = logging.LogRecord(name, logging.ERROR, __file__, 1, msg, (), None)
        r.created = at
        return r

    passed = [repeat.filter(record("aiokafka.conn", "Unable connect to node %s", t / 10)) for t in range(100)]
    assert passed.count(True) == 1
    assert repeat.filter(record("aiokafka.client", "Unable to update metadata", 1.0))  # another message: passes
    assert repeat.filter(record("streams.runtime", "same", 1.0)) and repeat.filter(record("streams.runtime", "same", 1.1))
    late = record("aiokafka.conn", "Unable connect to node %s", 70.0)
    assert repeat.filter(late) and "99 more" in late.msg


def test_point_ids_are_rfc_4122_uuid5_of_the_id_and_chunk():
    import uuid as uuid_module

    from schemas.events import POINT_NAMESPACE

    for doc_id in ("a", "doc-42", "é" * 40, "x" * 512, "日本"):
        assert point_id(doc_id) == str(uuid_module.uuid5(POINT_NAMESPACE, doc_id))
        assert point_id(doc_id, 3) == str(uuid_module.uuid5(POINT_NAMESPACE, f"{doc_id}\x003"))
        assert uuid_module.UUID(point_id(doc_id)).version == 5


class _CommitRefusingConsumer:
    """The consumer side of `Commits`, answering each commit with the broker's error (no I/O to fake)."""

    def __init__(self, tp: TopicPartition) -> None:
        self.tp, self.error, self.log_end = tp, None, None

    def assignment(self) -> set:
        return {self.tp}

    async def position(self, tp: TopicPartition) -> int:
        raise BrokerError("no position", kind="NotAssigned")

    async def commit(self, offsets: dict) -> None:
        if self.error == "never":
            await asyncio.Event().wait()  # aiokafka retrying a retriable error without end
        if self.error is not None:
            raise self.error

    async def end_offsets(self, partitions: list) -> dict:
        return {}

    def highwater(self, tp: TopicPartition) -> int | None:
        return self.log_end


def _commits_with_finished(consumer: _CommitRefusingConsumer, count: int, **options) -> Commits:
    tracker, fencing = OffsetTracker(), Fencing()
    fencing.assign([consumer.tp])
    commits = Commits(consumer=lambda: consumer, tracker=tracker, fencing=fencing, metrics=Metrics(CollectorRegistry()), **options)
    tracker.set_committed(consumer.tp, 0)
    for offset in range(count):
        tracker.register(consumer.tp, offset, timestamp=offset)
        tracker.finish(consumer.tp, offset)
    return commits


async def test_a_commit_that_never_completes_is_given_up_and_counted():
    """aiokafka retries a retriable commit error (an unknown topic) without end: the commit, and
    the housekeeping behind it (lag, the lost-log check), must not wait for ever."""
    consumer = _CommitRefusingConsumer(TopicPartition("events", 0))
    consumer.error = "never"
    commits = _commits_with_finished(consumer, 3, commit_timeout_seconds=0.05)
    async with asyncio.timeout(5):
        await commits.commit()
    assert commits.metrics.registry.get_sample_value("embedworker_offset_commit_failures_total", {"error": "unavailable"}) == 1
    assert commits.tracker.to_commit() == {consumer.tp: 3}  # still to commit: retried next time


async def test_a_log_ending_below_the_committed_offset_says_the_broker_lost_its_state(caplog):
    """A broker that restarted empty may still take the commit aiokafka kept retrying: the rejoin then
    reads no offset going back, and the fetch highwater below the commit is the sign left."""
    consumer = _CommitRefusingConsumer(TopicPartition("events", 0))
    commits = _commits_with_finished(consumer, 20)
    await commits.commit()
    consumer.log_end = 20
    await commits.update_lag(timeout=1)
    assert not [r for r in caplog.records if r.levelname == "ERROR"]
    consumer.log_end = 0
    await commits.update_lag(timeout=1)
    await commits.update_lag(timeout=1)
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "the broker lost its state" in errors[0] and "ends at 0" in errors[0]


def test_only_a_refusal_of_scripting_itself_turns_cache_writes_to_sets_for_good():
    from redis.exceptions import NoPermissionError, ResponseError

    from processors.cache import _scripting_refused

    assert _scripting_refused(NoPermissionError("this user has no permissions to run the 'evalsha' command"))
    assert _scripting_refused(ResponseError("ERR unknown command 'EVALSHA', with args beginning with: "))
    assert not _scripting_refused(ResponseError("BUSY Redis is busy running a script."))
    assert not _scripting_refused(ResponseError("OOM command not allowed when used memory > 'maxmemory'."))
    assert not _scripting_refused(ResponseError("READONLY You can't write against a read only replica."))
