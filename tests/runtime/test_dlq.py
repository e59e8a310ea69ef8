"""Dead letters: the breaker that stops dead-lettering a whole topic, and `embedworker dlq replay`.

- the breaker's counting (no I/O), the envelope decoding and the replay count header;
- the breaker in the real `Worker` on the in-memory broker: it pauses, holds the rest
  uncommitted, and a restart loses nothing;
- `dlq replay` on the real broker, against a running worker that dead-letters the replays
  again: the replay count travels, and a dead letter at the limit is refused.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from datetime import datetime, timezone
from typing import Any

import orjson
import pytest
from streams.backends import TopicPartition

from doubles import WordEmbedder
from schemas import REPLAY_COUNT_HEADER, InvalidEvent, SourcePosition, decode_dead_letter, encode_dead_letter, replay_count
from streams.backends.memory import MemoryBroker
from streams.breaker import DeadLetterBreaker, DeadLetterLimit
from streams.commands.dlq import parse_since
from streams.config import ConfigError, load_settings
from streams.flow import FlowController, FlowSignals, Watermarks
from streams.backends.kafka import make_producer
from streams.metrics import Metrics
from streams.runtime import WorkerObserver
from support import run_cli
from support import make_settings, memory_settings, read_topic, running_worker, until, worker_on


# ---- the breaker's counting ----------------------------------------------------------------


def test_breaker_refuses_the_dead_letter_past_the_consecutive_limit_per_partition():
    breaker = DeadLetterBreaker(limit=DeadLetterLimit(max_ratio=0, window=100, max_consecutive=3))
    assert [breaker.admit("p0") for _ in range(3)] == [True, True, True]  # the limit is the most that may go out
    breaker.record_valid("p0")  # a valid message ends the run
    assert [breaker.admit("p0") for _ in range(3)] == [True, True, True]
    assert [breaker.admit("p1") for _ in range(3)] == [True, True, True]  # partitions count apart
    assert not breaker.open
    assert breaker.admit("p0") is False
    assert breaker.open and breaker.trip is not None
    assert (breaker.trip.partition, breaker.trip.reason, breaker.trip.consecutive) == ("p0", "consecutive", 4)
    # Open for good: every partition's dead letters are held, valid messages change nothing.
    breaker.record_valid("p1")
    assert breaker.admit("p1") is False and breaker.admit("p2") is False


def test_breaker_ratio_is_judged_over_a_full_sliding_window():
    breaker = DeadLetterBreaker(limit=DeadLetterLimit(max_ratio=0.5, window=10, max_consecutive=0))
    for _ in range(6):  # 6 of 6: over half, but the window is not full yet
        assert breaker.admit("p")
    for _ in range(4):
        breaker.record_valid("p")
    # Full window: 6 of the last 10. The next dead letter pushes out the oldest (a dead
    # letter), so it stays 6 of 10 > 5: refused.
    assert breaker.admit("p") is False
    assert breaker.trip is not None and breaker.trip.reason == "ratio"
    assert (breaker.trip.dead_letters_in_window, breaker.trip.window_messages) == (6, 10)


def test_breaker_window_forgets_old_dead_letters():
    breaker = DeadLetterBreaker(limit=DeadLetterLimit(max_ratio=0.5, window=10, max_consecutive=0))
    for _ in range(5):
        assert breaker.admit("p")
    for _ in range(5):
        breaker.record_valid("p")
    for _ in range(5):  # the first five dead letters leave the window
        breaker.record_valid("p")
    # Had they stayed, the first of these would make 6 dead letters in the window.
    assert [breaker.admit("p") for _ in range(5)] == [True] * 5  # 5 of the last 10
    assert breaker.admit("p") is False  # 6 of the last 10


def test_breaker_off_and_revoked_partitions():
    off = DeadLetterBreaker(limit=DeadLetterLimit(max_ratio=0, window=1, max_consecutive=0))
    assert all(off.admit("p") for _ in range(10_000)) and not off.open
    breaker = DeadLetterBreaker(limit=DeadLetterLimit(max_ratio=0, window=10, max_consecutive=2))
    assert breaker.admit("p") and breaker.admit("p")
    breaker.forget(["p"])  # the next owner counts afresh
    assert breaker.admit("p") and breaker.admit("p") and not breaker.open
    with pytest.raises(ValueError):
        DeadLetterLimit(max_ratio=1.5, window=10, max_consecutive=0)
    with pytest.raises(ValueError):
        DeadLetterLimit(max_ratio=0.5, window=0, max_consecutive=0)


def test_flow_pauses_for_the_dead_letter_limit():
    marks = Watermarks(high=10, low=5)
    flow = FlowController(buffered_messages=marks, buffered_bytes=marks, in_flight_batches=marks, memory_bytes=None)
    signals = dict(buffered_messages=0, buffered_bytes=0, in_flight_batches=0, rss_bytes=0, sink_healthy=True)
    assert flow.update(FlowSignals(**signals)) == set()
    assert flow.update(FlowSignals(**signals, dead_letter_limit=True)) == {"dead_letter_limit"}


def test_breaker_settings_defaults_and_bad_values():
    defaults = load_settings(environ={})
    assert (defaults.dlq_max_ratio, defaults.dlq_window, defaults.dlq_max_consecutive) == (0.5, 1000, 200)
    settings = load_settings(environ={"EMBEDWORKER_DLQ_MAX_RATIO": "0", "EMBEDWORKER_DLQ_MAX_CONSECUTIVE": "0"})
    assert (settings.dlq_max_ratio, settings.dlq_max_consecutive) == (0.0, 0)
    for variable, value in (("EMBEDWORKER_DLQ_MAX_RATIO", "1.5"), ("EMBEDWORKER_DLQ_WINDOW", "0"),
                            ("EMBEDWORKER_DLQ_MAX_CONSECUTIVE", "-1")):
        with pytest.raises(ConfigError) as caught:
            load_settings(environ={variable: value})
        assert caught.value.setting == variable


# ---- the envelope and the count --------------------------------------------------------------


SOURCE = SourcePosition(topic="texts", partition=2, offset=41)


@pytest.mark.parametrize("payload", [b"{not json", "caf\u00e9 {".encode(), b"\xff\xfe\x00binary", b"\x01" * 500])
def test_dead_letter_payload_round_trips_exactly(payload):
    letter = decode_dead_letter(encode_dead_letter(kind="invalid_json", message="m", source=SOURCE, payload=payload))
    assert (letter.payload, letter.error_type, letter.source, letter.missing) == (payload, "invalid_json", SOURCE, None)


def test_dead_letter_without_its_whole_payload_is_not_replayable():
    cut = decode_dead_letter(encode_dead_letter(kind="k", message="m", source=SOURCE, payload=b"x" * 100, max_payload_bytes=10))
    bare = decode_dead_letter(encode_dead_letter(kind="k", message="m", source=SOURCE, payload=b"x" * 100, max_payload_bytes=0))
    tombstone = decode_dead_letter(encode_dead_letter(kind="missing_id", message="m", source=SOURCE, payload=None))
    assert (cut.payload, cut.missing) == (None, "truncated")
    assert (bare.payload, bare.missing) == (None, "truncated")
    assert (tombstone.payload, tombstone.missing) == (None, "absent")
    for raw in (None, b"nope", b"[1]", b'{"error": "x"}',
                orjson.dumps({"error": {"type": "k"}, "payload": "!!", "payload_encoding": "base64"}),
                orjson.dumps({"error": {"type": "k"}, "payload": "x", "payload_encoding": "rot13"})):
        with pytest.raises(InvalidEvent):
            decode_dead_letter(raw)
    assert decode_dead_letter(orjson.dumps({"error": {"type": "k"}, "payload": base64.b64encode(b"ok").decode(),
                                            "payload_encoding": "base64"})).payload == b"ok"


def test_replay_count_header():
    assert replay_count(None) == 0 and replay_count([("traceparent", b"00-x")]) == 0
    assert replay_count([(REPLAY_COUNT_HEADER, b"2")]) == 2
    for garbled in (b"-1", b"two", b"", b"1e3", "\u0661".encode()):
        assert replay_count([(REPLAY_COUNT_HEADER, garbled)]) is None, garbled


def test_since_takes_durations_and_iso_times():
    assert parse_since("90m", now=10_000.0) == 10_000.0 - 5400
    assert parse_since("2d", now=200_000.0) == 200_000.0 - 172_800
    utc = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc).timestamp()
    assert parse_since("2026-01-02T03:04:05Z") == parse_since("2026-01-02T03:04:05") == utc  # naive is UTC
    assert parse_since("2026-01-02T05:04:05+02:00") == utc
    for bad in ("yesterday", "1y", "-1h", ""):
        with pytest.raises(ValueError):
            parse_since(bad)


# ---- the breaker in the worker (in-memory broker) -----------------------------------------


def _body(doc_id: str, text: str) -> bytes:
    return orjson.dumps({"id": doc_id, "text": text})


async def test_the_breaker_pauses_and_holds_dead_letters_uncommitted_and_a_restart_loses_nothing(caplog):
    broker = MemoryBroker()
    settings = memory_settings(broker, dlq_max_consecutive=3, dlq_max_ratio=0)
    tp = TopicPartition(settings.input_topic, 0)
    for i in range(2):
        broker.append(settings.input_topic, _body(f"ok-{i}", f"text {i}"), partition=0)
    for i in range(10):  # a broken upstream: offsets 2-11
        broker.append(settings.input_topic, b"{secret-payload %d" % i, partition=0)
    for i in range(2):  # valid again at 12, 13
        broker.append(settings.input_topic, _body(f"late-{i}", f"later text {i}"), partition=0)
    metrics = Metrics()
    rounds = {"n": 0}
    observer = WorkerObserver(on_fetch_round=lambda: rounds.__setitem__("n", rounds["n"] + 1))
    sample = metrics.registry.get_sample_value
    with caplog.at_level(logging.INFO):
        async with worker_on(broker, settings, metrics=metrics, observer=observer) as worker:
            await until(lambda: sample("embedworker_dead_letter_breaker_held_messages") == 7, "the rest held")
            # Processing goes on for valid messages; the commit stops before the first held one.
            await until(lambda: len(broker.records(settings.output_topic)) == 4, "the valid messages' results")
            await until(lambda: broker.committed(settings.group_id, tp) == 5, "the commit up to the first held message")
            assert sample("embedworker_dead_letter_breaker_open") == 1
            assert sample("embedworker_dead_letter_breaker_trips_total") == 1
            assert sample("embedworker_backpressure_reason_active", {"reason": "dead_letter_limit"}) == 1
            assert sample("embedworker_backpressure_paused") == 1
            # Paused: what arrives now is not even fetched (fetch rounds, not time, are the clock).
            consumed = worker.stats.consumed
            broker.append(settings.input_topic, b"{more secret", partition=0)
            start = rounds["n"]
            await until(lambda: rounds["n"] >= start + 5, "fetch rounds while paused")
            assert worker.stats.consumed == consumed == 14
            assert broker.committed(settings.group_id, tp) == 5 and worker.unfinished() == 7
    dead = [orjson.loads(r.value) for r in broker.records(settings.dlq_topic)]
    assert [d["source"]["offset"] for d in dead] == [2, 3, 4]  # the three before the trip, nothing after
    (trip,) = [r for r in caplog.records if "dead-letter limit reached" in r.getMessage()]
    assert trip.levelno == logging.ERROR
    assert f"{settings.input_topic}[0] at offset 5: 4 dead letters in a row (limit 3)" in trip.getMessage()
    assert not [r for r in caplog.records if "secret" in r.getMessage()], "a payload reached the logs"

    # Restarted with the limit lifted (the operator's choice for a topic that is bad for good):
    # every held message is replayed from the commit; none was lost.
    async with worker_on(broker, settings.replace(dlq_max_consecutive=0)) as worker:
        await until(lambda: broker.committed(settings.group_id, tp) == 15, "the rest after the restart")
        assert not worker.breaker.open
    offsets = [orjson.loads(r.value)["source"]["offset"] for r in broker.records(settings.dlq_topic)]
    assert offsets == [2, 3, 4] + list(range(5, 12)) + [14]


async def test_held_messages_of_a_revoked_partition_are_released_to_the_next_owner():
    broker = MemoryBroker()
    settings = memory_settings(broker, dlq_max_consecutive=1, dlq_max_ratio=0)
    tp = TopicPartition(settings.input_topic, 0)
    for i in range(5):
        broker.append(settings.input_topic, b"{bad %d" % i, partition=0)
    metrics = Metrics()
    sample = metrics.registry.get_sample_value
    async with worker_on(broker, settings, metrics=metrics) as worker:
        await until(lambda: sample("embedworker_dead_letter_breaker_held_messages") == 4, "four held")
        await until(lambda: broker.committed(settings.group_id, tp) == 1, "the one dead letter committed")
        assert worker.unfinished() == 4
        epoch = worker.fencing.epochs[tp]
        broker.rebalance(settings.group_id)  # revoked and (the only member) assigned again
        await until(lambda: worker.fencing.epochs.get(tp, epoch) != epoch, "the new assignment")
        # Released, not finished: the buffer is empty again, the commit did not move, and the
        # still-open breaker keeps the partition paused instead of fetching them again.
        assert worker.unfinished() == 0 and sample("embedworker_dead_letter_breaker_held_messages") == 0
        assert broker.committed(settings.group_id, tp) == 1 and worker.breaker.open
        assert tp in broker.groups[settings.group_id].owners[tp].paused()
    assert len(broker.records(settings.dlq_topic)) == 1


async def test_the_default_limits_let_scattered_dead_letters_through():
    broker = MemoryBroker()
    settings = memory_settings(broker)
    tp = TopicPartition(settings.input_topic, 0)
    for i in range(1500):  # 450 bad, in runs of 150: at most 400 of any 1,000 (limit 500), 150 in a row (limit 200)
        bad = (i // 150) % 3 == 1
        broker.append(settings.input_topic, b"{bad" if bad else _body(f"id-{i}", f"text {i % 7}"), partition=0)
    async with worker_on(broker, settings) as worker:
        await until(lambda: broker.committed(settings.group_id, tp) == 1500, "the whole partition", timeout=60)
        assert not worker.breaker.open
    assert len(broker.records(settings.dlq_topic)) == 450


# ---- `embedworker dlq replay` (real broker) -------------------------------------------------


def test_dlq_replay_help_names_every_option(capsys, clean_cli_state):
    code, out, err = run_cli(capsys, "dlq", "replay", "--help")
    assert code == 0 and not err
    for option in ("--error-type", "--since", "--limit", "--max-replays", "--dry-run", "--timeout", "--dlq-topic",
                   "--input-topic", "--bootstrap-servers"):
        assert option in out
    code, out, err = run_cli(capsys, "dlq", "replay", "--since", "last week")
    assert code == 2 and "--since" in err and len(err.strip().splitlines()) == 1 and not out


TRACE = ("traceparent", b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")


async def _send(settings: Any, records: list[tuple[bytes | None, bytes | None]]) -> None:
    producer = make_producer(settings)
    await producer.start()
    try:
        for key, value in records:
            await producer.send_and_wait(settings.input_topic, value=value, key=key, headers=[TRACE])
    finally:
        await producer.stop()


def _replayed(records: list[Any]) -> list[Any]:
    return [r for r in records if dict(r.headers or ()).get(REPLAY_COUNT_HEADER)]


@pytest.mark.integration
async def test_replay_republishes_dead_letters_counts_replays_and_refuses_them_at_the_limit(services, capsys, clean_cli_state):
    settings = await make_settings(services, partitions=2, dlq_max_payload_bytes=64)
    bad = {b"k1": b"{not json 1", b"k2": b"{not json 2", b"k3": b"[1, 2]"}
    inputs = [*bad.items(), (b"k4", b"{" + b"x" * 200), (b"\xff", None), (b"ok", b'{"id": "ok", "text": "a fine text"}')]
    kafka = ["--bootstrap-servers", settings.bootstrap_servers, "--input-topic", settings.input_topic,
             "--dlq-topic", settings.dlq_topic]

    async with running_worker(settings, WordEmbedder(max_tokens=64)) as worker:
        await _send(settings, inputs)
        # Three replayable dead letters, one cut to 64 bytes, one tombstone with a non-UTF-8 key (no payload).
        first = await read_topic(settings, settings.dlq_topic, expect=5, timeout=60)
        assert len(first) == 5
        await until(lambda: worker.stats.processed == 1, timeout=60, what="the valid event")

        code, out, err = await asyncio.to_thread(run_cli, capsys, "dlq", "replay", "--max-replays", "1", *kafka)
        assert code == 0, err
        assert out.strip() == (f"replayed 3 dead letters from {settings.dlq_topic} to {settings.input_topic}; "
                               "skipped past limit 0, not replayable 2, filtered out 0")
        assert "payload truncated, not replayable" in err and "no payload, not replayable" in err

        sent = _replayed(await read_topic(settings, settings.input_topic, expect=len(inputs) + 3, timeout=60))
        assert sorted((r.key, r.value) for r in sent) == sorted(bad.items())  # original key and bytes, exactly
        assert all(dict(r.headers)[REPLAY_COUNT_HEADER] == b"1" and dict(r.headers)["traceparent"] == TRACE[1] for r in sent)

        # Nothing was fixed: the worker dead-letters them again, and the new dead letters carry the count.
        again = _replayed(await read_topic(settings, settings.dlq_topic, expect=8, timeout=60))
        assert sorted(r.key for r in again) == sorted(bad)
        assert all(dict(r.headers)[REPLAY_COUNT_HEADER] == b"1" and dict(r.headers)["traceparent"] == TRACE[1] for r in again)

        # A millisecond early: the ISO round trip must not put the first new dead letter before it.
        since = datetime.fromtimestamp((min(r.timestamp for r in again) - 1) / 1000, tz=timezone.utc).isoformat()
        code, out, err = await asyncio.to_thread(
            run_cli, capsys, "dlq", "replay", "--max-replays", "1", "--since", since, *kafka)
        assert code == 0, err
        assert out.strip() == (f"replayed 0 dead letters from {settings.dlq_topic} to {settings.input_topic}; "
                               "skipped past limit 3, not replayable 0, filtered out 5")
        assert err.count("replayed 1 times already (--max-replays 1), not replayed") == 3

        # A dry run with a filter counts and sends nothing.
        code, out, err = await asyncio.to_thread(
            run_cli, capsys, "dlq", "replay", "--dry-run", "--error-type", "not_an_object", "--max-replays", "2", *kafka)
        assert code == 0, err
        assert out.strip() == (f"would replay 2 dead letters from {settings.dlq_topic} to {settings.input_topic}; "
                               "skipped past limit 0, not replayable 0, filtered out 6")
        assert len(await read_topic(settings, settings.input_topic, expect=len(inputs) + 3, timeout=60)) == len(inputs) + 3
        assert len(await read_topic(settings, settings.dlq_topic, expect=8, timeout=30)) == 8


def test_a_message_failing_after_it_decoded_counts_once_as_a_dead_letter():
    """The model refusing every text of a trickle (one message a fetch) must trip it like decode failures do."""
    from streams.breaker import DeadLetterBreaker, DeadLetterLimit

    breaker = DeadLetterBreaker(limit=DeadLetterLimit(max_ratio=0.5, window=10, max_consecutive=4))
    admitted = []
    for offset in range(10):
        breaker.record_valid("p", offset)  # it decoded
        admitted.append(breaker.admit("p", offset))  # then the model refused it
    assert admitted == [True] * 4 + [False] * 6  # the fifth in a row trips the consecutive limit
    assert breaker.trip is not None and breaker.trip.consecutive == 5 and breaker.trip.window_messages == 5

    ratio = DeadLetterBreaker(limit=DeadLetterLimit(max_ratio=0.5, window=10, max_consecutive=0))
    for offset in range(20):
        ratio.record_valid("p", offset)
        if offset % 3 == 0 or offset % 3 == 1:
            ratio.admit("p", offset)  # 2 of every 3 fail in the model
    assert ratio.open and ratio.trip.reason == "ratio"
