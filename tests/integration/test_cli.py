"""The command line: help, one-line errors, and produce/status/search/reembed on real services."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import orjson
import pytest
from prometheus_client import Gauge, start_http_server

from streams.assembly import build_sink
from schemas import point_id
from support import run_cli
from streams import cli
from streams.commands import produce as produce_command, reembed as reembed_command
from streams.commands.common import _sibling
from streams.devstack import free_port
from streams.metrics import Metrics
from support import committed_offsets, event, make_settings, produce, read_topic, running_worker, until
from support import retrieve, point_ids

COMMANDS = ("run", "demo", "produce", "search", "status", "reembed")

CORPUS = [
    ("bill", "Hello, I was charged twice for the same order and want a refund."),
    ("snow", "The national weather service warned of heavy snow in the mountains."),
    ("rice", "Toast the rice in olive oil before adding the stock a ladle at a time."),
    ("keys", "To rotate the credentials, create a new key, deploy it, then revoke the old one."),
    ("shoe", "The running shoes feel sturdy and well made."),
    ("bank", "The central bank raised interest rates by a quarter point."),
    ("vacu", "The robot vacuum stopped working after two weeks."),
    ("tree", "Volunteers planted two thousand trees along the river."),
]


@pytest.fixture(autouse=True)
def _clean_cli_state(clean_cli_state):
    """Every test here runs the CLI in this process."""
    yield


async def arun_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """The same from an async test: the CLI runs its own event loop, so on a thread."""
    return await asyncio.to_thread(run_cli, capsys, *argv)


def assert_one_line_error(code: int, err: str, expected: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code != 0, err
    assert "Traceback" not in err
    assert len(lines) == 1, err
    assert expected in lines[0], lines[0]


def _subparser(name: str):
    parser = cli.build_parser()
    return parser._subparsers._group_actions[0].choices[name]  # noqa: SLF001


# ---- help and usage errors (no services) ----------------------------------------------------


@pytest.mark.parametrize("command", COMMANDS)
def test_help_of_every_command_mentions_every_option(capsys, command):
    code, out, err = run_cli(capsys, command, "--help")
    assert code == 0 and not err
    for action in _subparser(command)._actions:  # noqa: SLF001
        for option in action.option_strings:
            assert option in out, f"{command} --help does not mention {option}"
        if not action.option_strings:
            assert action.metavar in out
        if action.help and action.option_strings != ["-h", "--help"]:
            assert action.help.split()[0].replace("%%", "%") in out


def test_top_level_help_lists_every_command(capsys):
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0
    for command in COMMANDS + ("faust",):
        assert command in out


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_user_mistakes_are_one_line_without_traceback(capsys, tmp_path):
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    lines = _write(tmp_path, "texts.txt", "one\ntwo\n")
    bad_json = _write(tmp_path, "bad.jsonl", '{"id": "a", "text": "fine"}\n{"id": "b", "text": \n')
    no_text = _write(tmp_path, "no_text.jsonl", '{"id": "a", "body": "x"}\n')
    empty_text = _write(tmp_path, "empty.jsonl", '{"id": "a", "text": "   "}\n')
    bad_csv = _write(tmp_path, "bad.csv", "id,body\n1,hello\n")
    wide_csv = _write(tmp_path, "wide.csv", "id,text\n1,hello,extra\n")
    empty_store = tmp_path / "store"
    empty_store.mkdir()  # an empty embedded store (the default edge engine: no shard yet)
    cases = [
        (["produce", tmp_path / "missing.txt"], "cannot read"),
        (["produce", tmp_path], "cannot read"),
        (["produce", lines, "--format", "xml"], "invalid choice: 'xml'"),
        (["produce", bad_json, "--format", "jsonl"], "bad.jsonl:2: not valid JSON"),
        (["produce", no_text, "--format", "jsonl"], "no_text.jsonl:1: no field 'text'"),
        (["produce", empty_text, "--format", "jsonl"], "empty.jsonl:1: field 'text' is empty"),
        (["produce", bad_csv, "--format", "csv"], "no column 'text'"),
        (["produce", wide_csv, "--format", "csv"], "wide.csv:2: more cells than header columns"),
        (["produce", _write(tmp_path, "blank.txt", "\n \n")], "no texts to send"),
        (["produce", lines, "--bootstrap-servers", dead], f"cannot reach Kafka at {dead}"),
        (["produce", lines, "--timeout", "-1"], "positive number of seconds"),
        (["status", "--bootstrap-servers", dead], f"cannot reach Kafka at {dead}"),
        (["status", "--metrics-url", "localhost:9108"], "must start with http://"),
        (["search", "anything"], "no Qdrant configured"),
        (["search", "anything", "--qdrant-path", tmp_path / "nowhere"], "no Qdrant store at"),
        (["search", "anything", "--qdrant-path", empty_store], "collection 'texts' does not exist"),
        (["search", "   ", "--qdrant-path", empty_store], "the query is empty"),
        (["search", "q", "--limit", "0"], "expected a positive integer"),
        (["reembed", "--model", "all-MiniLM-L6-v2"], "one of the arguments --from-collection --from-topic is required"),
        (["reembed", "--model", "m", "--from-collection", "--from-topic"], "not allowed with argument"),
        (["reembed", "--model", "m", "--from-collection", "--start-offset", "3"], "only apply to --from-topic"),
        (["reembed", "--model", "m", "--from-topic", "--start-offset", "5", "--end-offset", "2"], "below --start-offset"),
        (["reembed", "--model", "m", "--from-collection", "c", "--target-collection", "c", "--qdrant-path", empty_store], "must differ"),
        (["reembed", "--model", "all-MiniLM-L6-v2", "--from-collection", "--qdrant-path", empty_store], "collection 'texts' does not exist"),
        (["run", "--batch-min-messages", "0"], "EMBEDWORKER_BATCH_MIN_MESSAGES"),
        (["nonsense"], "invalid choice"),
    ]
    for argv, expected in cases:
        code, out, err = run_cli(capsys, *argv)
        assert_one_line_error(code, err, expected)
        assert not out.strip(), (argv, out)


def test_errors_are_json_lines_under_log_format_json(capsys):
    dead = f"127.0.0.1:{free_port()}"
    code, _, err = run_cli(capsys, "status", "--bootstrap-servers", dead, "--log-format", "json")
    assert_one_line_error(code, err, "cannot reach Kafka")
    body = orjson.loads(err.strip())
    assert body["level"] == "error" and dead in body["message"]


def test_read_events_mapping(tmp_path):
    settings = cli.load_settings({}, environ={})
    path = _write(tmp_path, "in.jsonl", '{"doc": 7, "body": "a text", "lang": "en", "metadata": {"k": 1}}\n\n{"body": "b"}\n')
    events, skipped = produce_command.read_events(str(path), "jsonl", settings, id_field="doc", text_field="body", id_prefix="src-")
    assert skipped == 0
    assert [(e.id, e.text, e.metadata) for e in events] == [("src-7", "a text", {"k": 1, "lang": "en"}), ("src-3", "b", {})]
    path = _write(tmp_path, "in.txt", "x\n\n  \ny\r\n")
    events, _ = produce_command.read_events(str(path), "lines", settings)
    assert [(e.id, e.text) for e in events] == [("in.txt:1", "x"), ("in.txt:4", "y")]
    path = _write(tmp_path, "skip.jsonl", '{"id": "a", "text": "ok"}\nnot json\n{"id": "c", "text": ""}\n')
    events, skipped = produce_command.read_events(str(path), "jsonl", settings, skip_invalid=True)
    assert [e.id for e in events] == ["a"] and skipped == 2
    assert reembed_command.model_short_name("sentence-transformers/all-MiniLM-L6-v2") == "all-minilm-l6-v2"
    assert reembed_command.model_short_name("/models/My Model v2/") == "my-model-v2"


# ---- on real services ----------------------------------------------------------------------


def _kafka_args(settings) -> list[str]:
    return ["--bootstrap-servers", settings.bootstrap_servers, "--input-topic", settings.input_topic]


def _values(records) -> list[dict]:
    return [orjson.loads(r.value) for r in records]


@pytest.mark.integration
async def test_produce_lines_jsonl_csv_and_stdin(services, capsys, tmp_path, monkeypatch):
    settings = await make_settings(services, partitions=2)
    args = _kafka_args(settings)

    lines = _write(tmp_path, "notes.txt", "first text\n\nsecond text\n")
    code, out, err = await arun_cli(capsys, "produce", lines, *args)
    assert code == 0, err
    assert out.strip().splitlines()[-1] == f"sent 2 events to {settings.input_topic}"

    jsonl = _write(tmp_path, "docs.jsonl", '{"doc_id": "d1", "body": "third text", "lang": "en"}\n{"doc_id": 2, "body": "fourth text"}\n')
    code, out, err = await arun_cli(capsys, "produce", jsonl, "--format", "jsonl", "--id-field", "doc_id", "--text-field", "body", *args)
    assert code == 0 and f"sent 2 events to {settings.input_topic}" in out, err

    table = _write(tmp_path, "rows.csv", 'id,text,author\nc1,"fifth, with a comma",ann\nc2,sixth text,bob\n')
    code, out, err = await arun_cli(capsys, "produce", table, "--format", "csv", "--id-prefix", "csv-", *args)
    assert code == 0 and f"sent 2 events to {settings.input_topic}" in out, err

    monkeypatch.setattr(sys, "stdin", io.StringIO("from stdin\n"))
    code, out, err = await arun_cli(capsys, "produce", "-", "--id-prefix", "in-", *args)
    assert code == 0 and "sent 1 events" in out, err

    # A file with a bad record sends nothing at all.
    bad = _write(tmp_path, "bad.jsonl", '{"id": "ok", "text": "never sent"}\n[1]\n')
    code, out, err = await arun_cli(capsys, "produce", bad, "--format", "jsonl", *args)
    assert_one_line_error(code, err, "bad.jsonl:2: expected a JSON object")

    records = await read_topic(settings, settings.input_topic, expect=7, timeout=30)
    got = sorted(_values(records), key=lambda v: v["text"])
    assert got == sorted(
        [
            {"id": "notes.txt:1", "text": "first text"},
            {"id": "notes.txt:3", "text": "second text"},
            {"id": "d1", "text": "third text", "metadata": {"lang": "en"}},
            {"id": "2", "text": "fourth text"},
            {"id": "csv-c1", "text": "fifth, with a comma", "metadata": {"author": "ann"}},
            {"id": "csv-c2", "text": "sixth text", "metadata": {"author": "bob"}},
            {"id": "in-1", "text": "from stdin"},
        ],
        key=lambda v: v["text"],
    )
    for record in records:
        assert record.key == orjson.loads(record.value)["id"].encode()


def _serve_metrics(metrics: Metrics):
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=metrics.registry)
    return f"http://127.0.0.1:{port}/metrics", server, thread


async def _status(capsys, settings, *extra: str) -> dict:
    code, out, err = await arun_cli(capsys, "status", "--json", "--group-id", settings.group_id, *_kafka_args(settings), *extra)
    assert code == 0, err
    return orjson.loads(out)


@pytest.mark.integration
async def test_status_lag_matches_the_truth(services, embedder, capsys):
    settings = await make_settings(services, partitions=3)
    count = 40
    await produce(settings, [event(f"s-{i}", f"status text number {i}") for i in range(count)], keys=[f"k{i}".encode() for i in range(count)])
    records = await read_topic(settings, settings.input_topic, expect=count, timeout=30)
    truth = {p: sum(1 for r in records if r.partition == p) for p in range(3)}
    assert sum(truth.values()) == count and max(truth.values()) > 1  # spread: a multi-record last batch

    report = await _status(capsys, settings)
    assert report["topic"] == settings.input_topic and report["group"] == settings.group_id
    assert {p["partition"]: p["high_watermark"] for p in report["partitions"]} == truth
    assert {p["partition"]: p["lag"] for p in report["partitions"]} == truth
    assert all(p["committed"] is None for p in report["partitions"])
    assert report["total_lag"] == count and report["workers"] == []

    metrics = Metrics()
    url, server, thread = _serve_metrics(metrics)
    try:
        async with running_worker(settings, embedder, metrics=metrics) as worker:
            await until(lambda: worker.stats.processed == count, timeout=90, what="the backlog processed")
            await until(lambda: sum(worker.lag_records().values()) == 0 and len(worker.lag_records()) == 3, timeout=30, what="commits")
            report = await _status(capsys, settings, "--metrics-url", url, "--rate-interval", "0.2")
            (scraped,) = report["workers"]
            assert scraped["reachable"] and scraped["paused"] is False and scraped["processed_total"] == count
            assert scraped["rate_per_second"] is not None
            code, out, err = await arun_cli(capsys, "status", "--group-id", settings.group_id, "--metrics-url", url, *_kafka_args(settings))
            assert code == 0 and "total" in out and url in out and "paused" in out, err
    finally:
        server.shutdown()
        thread.join(timeout=5)
    committed = await committed_offsets(settings, 3)
    assert committed == truth
    assert report["total_lag"] == 0
    assert {p["partition"]: (p["committed"], p["high_watermark"]) for p in report["partitions"]} == {p: (n, n) for p, n in truth.items()}

    # Five more with no worker: exactly five behind; an unreachable metrics URL is a row, not a failure.
    await produce(settings, [event(f"t-{i}", f"later text {i}") for i in range(5)])
    report = await _status(capsys, settings, "--metrics-url", url, "--rate-interval", "0.1")
    assert report["total_lag"] == 5
    assert report["workers"][0]["reachable"] is False and report["workers"][0]["error"]

    code, _, err = await arun_cli(capsys, "status", "--bootstrap-servers", settings.bootstrap_servers, "--input-topic", "no-such-topic-here")
    assert_one_line_error(code, err, "topic 'no-such-topic-here' does not exist")


@pytest.mark.integration
async def test_status_maps_partitions_to_workers_and_shows_pauses(services, capsys):
    """With `embedworker_partition_assigned` in a worker's metrics, partitions name their worker."""
    settings = await make_settings(services, partitions=2)
    metrics = Metrics()
    assigned = getattr(metrics, "partition_assigned", None) or Gauge(
        "embedworker_partition_assigned", "1 while this worker has the partition", ["topic", "partition"], registry=metrics.registry
    )
    assigned.labels(topic=settings.input_topic, partition="1").set(1)
    metrics.backpressure_paused.set(1)
    metrics.backpressure_reason.labels(reason="sink").set(1)
    metrics.messages_processed.inc(7)
    url, server, thread = _serve_metrics(metrics)
    try:
        report = await _status(capsys, settings, "--metrics-url", url, "--rate-interval", "0.1")
        code, out, err = await arun_cli(
            capsys, "status", "--group-id", settings.group_id, "--metrics-url", url, "--rate-interval", "0.1", *_kafka_args(settings)
        )
    finally:
        server.shutdown()
        thread.join(timeout=5)
    assert {p["partition"]: p["owner"] for p in report["partitions"]} == {0: None, 1: url}
    (worker,) = report["workers"]
    assert worker["paused"] is True and worker["pause_reasons"] == ["sink"] and worker["processed_total"] == 7
    assert code == 0, err
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split() and line.split()[0].isdigit()}
    assert rows["1"][4:6] == ["#1", "yes"] and rows["0"][4] == "-"
    assert "yes (sink)" in out


@pytest.fixture(scope="module")
async def corpus_store(services, embedder, tmp_path_factory):
    """CORPUS processed by a worker into an embedded Qdrant path store (sink closed after)."""
    path = str(tmp_path_factory.mktemp("qdrant"))
    settings = await make_settings(services, partitions=1, qdrant_path=path, qdrant_url="")
    await produce(settings, [event(i, text, topic=i) for i, text in CORPUS], keys=[i.encode() for i, _ in CORPUS])
    sink = build_sink(settings)
    try:
        async with running_worker(settings, embedder, sink=sink) as worker:
            await until(lambda: worker.stats.processed == len(CORPUS), timeout=90, what="the corpus processed")
    finally:
        await sink.close()  # one client per path: the CLI opens it next
    return settings


def _store_args(settings) -> list[str]:
    return ["--qdrant-path", settings.qdrant_path, "--collection", settings.collection]


@pytest.mark.integration
async def test_search_finds_the_nearest_text(corpus_store, capsys):
    settings = corpus_store
    code, out, err = await arun_cli(capsys, "search", "I was billed two times for one purchase", "--limit", "3", "--json", *_store_args(settings))
    assert code == 0, err
    hits = orjson.loads(out)
    assert len(hits) == 3 and hits[0]["id"] == "bill"
    assert hits[0]["payload"]["text"] == dict(CORPUS)["bill"] and hits[0]["point_id"] == point_id("bill")
    assert hits[0]["score"] >= hits[1]["score"] >= hits[2]["score"]

    code, out, err = await arun_cli(capsys, "search", "blizzard warning for the peaks", *_store_args(settings))
    assert code == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 5
    score, hit_id, text = lines[0].split("  ", 2)
    assert hit_id == "snow" and text == dict(CORPUS)["snow"] and 0 < float(score) <= 1


@pytest.mark.integration
async def test_reembed_collection_into_a_new_collection(corpus_store, capsys):
    settings = corpus_store
    code, out, err = await arun_cli(capsys, "reembed", "--model", "all-MiniLM-L6-v2", "--from-collection", *_store_args(settings))
    assert code == 0, err
    target_name = f"{settings.collection}-all-minilm-l6-v2"
    assert f"re-embedded {len(CORPUS)} texts" in out and target_name in out

    source = build_sink(settings)
    target = _sibling(source, target_name)  # noqa: SLF001  (one client per path)
    try:
        assert await target.count() == await source.count() == len(CORPUS)
        ids = await point_ids(source)
        before, after = await retrieve(source, ids), await retrieve(target, ids)
        from processors.embedder import model_version, resolve_model_path

        version = model_version(resolve_model_path("all-MiniLM-L6-v2"))
        assert version and version.startswith("sha256:")
        for pid in ids:
            (old_vector, old_payload), (new_vector, new_payload) = before[pid], after[pid]
            assert float(np.dot(old_vector, new_vector)) > 0.999
            for key in ("id", "text", "metadata", "content_hash"):
                assert new_payload[key] == old_payload[key]
            assert new_payload["model"] == "all-MiniLM-L6-v2" and new_payload["model_version"] == version
    finally:
        await source.close()


@pytest.mark.integration
async def test_reembed_a_topic_range(corpus_store, capsys):
    settings = corpus_store
    code, out, err = await arun_cli(
        capsys, "reembed", "--model", "all-MiniLM-L6-v2", "--from-topic", "--start-offset", "2", "--end-offset", "6",
        "--target-collection", "replayed", "--batch-size", "3", *_kafka_args(settings), *_store_args(settings),
    )
    assert code == 0, err
    assert "re-embedded 4 texts from topic" in out
    sink = build_sink(settings, "replayed")
    try:
        assert await sink.count() == 4
        points = await retrieve(sink, [point_id(i) for i, _ in CORPUS])
        assert sorted(payload["id"] for _, payload in points.values()) == sorted(i for i, _ in CORPUS[2:6])
    finally:
        await sink.close()


@pytest.mark.integration
async def test_run_logs_json_lines(services):
    settings = await make_settings(services, partitions=1)
    executable = Path(sys.executable).with_name("embedworker")
    argv = [
        str(executable), "run", "--log-format", "json", "--metrics-port", "0",
        "--bootstrap-servers", settings.bootstrap_servers, "--input-topic", settings.input_topic,
        "--output-topic", settings.output_topic, "--dlq-topic", settings.dlq_topic, "--group-id", settings.group_id,
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBEDWORKER_")} | {"HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    lines: list[str] = []
    assigned = threading.Event()

    def pump() -> None:
        for line in process.stderr:  # type: ignore[union-attr]
            lines.append(line)
            if "assigned" in line:
                assigned.set()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        await until(lambda: assigned.is_set() or process.poll() is not None, timeout=90, what="the worker to join")
        assert assigned.is_set(), "".join(lines)
        process.send_signal(signal.SIGTERM)
        await until(lambda: process.poll() is not None, timeout=60, what="the worker to stop")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    reader.join(timeout=5)
    assert process.returncode == 0, "".join(lines)
    bodies = [orjson.loads(line) for line in lines if line.strip()]  # every line is JSON
    assert all({"ts", "level", "logger", "message"} <= set(b) for b in bodies)
    messages = [b["message"] for b in bodies]
    assert any(m.startswith("assigned") for m in messages) and any(m.startswith("stopped cleanly") for m in messages)
