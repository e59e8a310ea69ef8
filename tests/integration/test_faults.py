"""Crashes, signals, broker restarts and secrets, with the worker as a real process.

The embedded Qdrant store (a directory) admits one process at a time, so the tests open
it only after the last worker process has exited.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import orjson
import pytest

from schemas import point_id
from streams.config import Settings
from streams.devstack import LocalBroker, free_port
from support import committed_offsets, event, make_settings, produce, read_topic, until
from support import retrieve

pytestmark = pytest.mark.integration

EMBEDWORKER = str(Path(sys.executable).with_name("embedworker"))


def worker_env(settings: Settings, store: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBEDWORKER_")}
    env.update(
        EMBEDWORKER_BOOTSTRAP_SERVERS=settings.bootstrap_servers,
        EMBEDWORKER_INPUT_TOPIC=settings.input_topic,
        EMBEDWORKER_OUTPUT_TOPIC=settings.output_topic,
        EMBEDWORKER_DLQ_TOPIC=settings.dlq_topic,
        EMBEDWORKER_GROUP_ID=settings.group_id,
        EMBEDWORKER_COLLECTION=settings.collection,
        EMBEDWORKER_REDIS_URL=settings.redis_url,
        EMBEDWORKER_METRICS_PORT="0",
        EMBEDWORKER_COMMIT_INTERVAL_MS="200",
        EMBEDWORKER_DEVICE="cpu",
        HF_HUB_OFFLINE="1",
    )
    if settings.qdrant_url:
        env["EMBEDWORKER_QDRANT_URL"] = settings.qdrant_url
    else:
        env["EMBEDWORKER_QDRANT_PATH"] = str(store)
    env.update(extra)
    return env


_workers: list[subprocess.Popen] = []


def start_worker(env: dict[str, str], log: Path) -> subprocess.Popen:
    process = subprocess.Popen([EMBEDWORKER, "run"], env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT)
    _workers.append(process)
    return process


@pytest.fixture(autouse=True)
def _no_worker_outlives_its_test():
    yield
    while _workers:
        process = _workers.pop()
        if process.poll() is None:
            process.kill()
            process.wait()


def open_store(settings: Settings, store: Path):
    """The store the worker processes wrote (same engine, same settings)."""
    from streams.assembly import build_sink

    return build_sink(settings if settings.qdrant_url else settings.replace(qdrant_path=str(store)))


async def test_crash_loop_with_sigkill_loses_nothing(services, embedder, tmp_path):
    """20,000 events; the worker is SIGKILLed at random moments 10 times and restarted."""
    total, kills = 20_000, 10
    rng = random.Random(5)
    settings = await make_settings(services, partitions=4)
    pool = [f"Incident {i}: the nightly backup of region {i % 9} finished {i % 13} minutes late." for i in range(1500)]
    texts = [pool[rng.randrange(len(pool))] for _ in range(total)]
    malformed = {rng.randrange(total) for _ in range(40)}
    values = [b"{broken json" if i in malformed else event(f"id-{i}", texts[i]) for i in range(total)]
    await produce(settings, values)
    store, log = tmp_path / "qdrant", tmp_path / "worker.log"
    env = worker_env(settings, store)

    killed = 0
    progress = []
    while killed < kills:
        process = start_worker(env, log)
        before = sum((await committed_offsets(settings, 4)).values())
        # Kill after random progress, or at once during start-up now and then.
        if rng.random() < 0.2:
            await asyncio.sleep(rng.uniform(0.5, 4.0))  # a random moment is the point of the test
        else:
            # Spread the kills over the backlog. A target past the last event is never
            # reached, and a worker on cached texts can finish the rest between two polls.
            room = max(1, min(1500, (total - before) // (kills - killed + 1)))
            target = min(total, before + rng.randint(min(200, room), room))
            await until(
                lambda: process.poll() is not None or _committed_sync(settings) >= target,
                timeout=120, what="progress before the kill", interval=0.5,
            )
        assert process.poll() is None, log.read_text()[-3000:]
        process.send_signal(signal.SIGKILL)
        process.wait()
        killed += 1
        progress.append(sum((await committed_offsets(settings, 4)).values()))

    starts = log.read_text().count("loading model")
    process = start_worker(env, log)
    try:
        # Its signal handlers must be in place before the SIGTERM below (the kills may have
        # finished the backlog already): they are once it logs "loading model".
        await until(lambda: log.read_text().count("loading model") > starts, timeout=60, what="the final worker to start")
        await until(lambda: _committed_sync(settings) >= total, timeout=600, what="the final worker to finish", interval=0.5)
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0, log.read_text()[-3000:]

    results = await read_topic(settings, settings.output_topic, expect=total - len(malformed), timeout=120)
    dead = await read_topic(settings, settings.dlq_topic, expect=len(malformed), timeout=60)
    result_ids = [orjson.loads(r.value)["id"] for r in results]
    valid_ids = {f"id-{i}" for i in range(total) if i not in malformed}
    assert set(result_ids) == valid_ids  # no loss
    dead_offsets = {orjson.loads(r.value)["source"]["offset"] for r in dead}
    assert len({(orjson.loads(r.value)["source"]["partition"], orjson.loads(r.value)["source"]["offset"]) for r in dead}) == len(malformed)

    sink = open_store(settings, store)
    try:
        assert await sink.count() == len(valid_ids)  # exactly one point per id
        sample = rng.sample(sorted(valid_ids), 200)
        points = await retrieve(sink, [point_id(i) for i in sample])
        expected = embedder.embed([texts[int(i.split("-")[1])] for i in sample]).vectors
        for event_id, vector in zip(sample, expected):
            assert float(np.dot(points[point_id(event_id)][0], vector)) > 0.999
    finally:
        await sink.close()
    duplicates = len(result_ids) - len(valid_ids)
    print(f"\ncrash loop: {total} events, {kills} SIGKILLs, committed at kills {progress}, {len(valid_ids)} points, "
          f"{duplicates} duplicate result events, {len(dead) - len(malformed)} duplicate dead letters, 0 lost, {len(dead_offsets)} dead-letter offsets")


def _committed_sync(settings: Settings) -> int:
    """Committed total read from a short-lived process-local loop (used inside polling lambdas)."""
    return _run_sync(committed_offsets(settings, 4))


def _run_sync(coroutine):
    import threading

    result: list = []
    thread = threading.Thread(target=lambda: result.append(asyncio.run(coroutine)))
    thread.start()
    thread.join()
    return sum(result[0].values())


async def test_sigterm_drains_commits_and_exits_zero_and_a_second_signal_exits_at_once(services, tmp_path):
    settings = await make_settings(services, partitions=2)
    await produce(settings, [event(f"id-{i}", f"graceful shutdown text number {i}") for i in range(400)])
    store, log = tmp_path / "qdrant", tmp_path / "worker.log"
    process = start_worker(worker_env(settings, store), log)
    await until(lambda: _committed_sync(settings) >= 50, timeout=120, what="some progress", interval=0.3)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0, log.read_text()[-3000:]
    # Nothing committed without a result: per partition, every input offset below the
    # committed one has a result event (by id) or a dead letter naming that offset.
    committed = await committed_offsets(settings, 2)
    inputs = await read_topic(settings, settings.input_topic, expect=400)
    results = await read_topic(settings, settings.output_topic)
    dead = await read_topic(settings, settings.dlq_topic)
    result_ids = {orjson.loads(r.value)["id"] for r in results}
    dead_at = {(orjson.loads(r.value)["source"]["partition"], orjson.loads(r.value)["source"]["offset"]) for r in dead}
    id_at = {(r.partition, r.offset): orjson.loads(r.value)["id"] for r in inputs}
    assert sum(committed.values()) >= 50
    for partition, offset in committed.items():
        missing = [o for o in range(offset) if id_at[(partition, o)] not in result_ids and (partition, o) not in dead_at]
        assert not missing, f"partition {partition}: offsets {missing[:5]} committed without a result"
    assert "stopped cleanly" in log.read_text()

    process = start_worker(worker_env(settings, store), log)
    await until(lambda: "assigned" in log.read_text(), timeout=120, what="the second worker to start", interval=0.3)
    process.send_signal(signal.SIGTERM)
    process.send_signal(signal.SIGTERM)
    started = time.monotonic()
    assert process.wait(timeout=30) != 0
    assert time.monotonic() - started < 10

    # A SIGTERM while the model is still loading is a clean stop too.
    log.write_bytes(b"")
    process = start_worker(worker_env(settings, store), log)
    await until(lambda: "loading model" in log.read_text(), timeout=60, what="the model to start loading", interval=0.05)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0, log.read_text()[-3000:]


async def test_broker_restart_reconnects_and_reports_the_lost_log(embedder, caplog):
    """The local broker keeps its log in memory: a restart is a fresh, empty log.

    The worker survives the restart, reconnects, rejoins its group and says in one clear
    error that the group's committed offsets went back (the broker lost its state). What
    it processes next depends on the fresh broker; the replay path of a broker restart
    that keeps its log is the crash-loop test's, and runs on testcontainers' Kafka.
    """
    from support import Services, running_worker, start_services

    with LocalBroker() as broker:
        redis = start_services() if not os.environ.get("REDIS_URL") else None
        services = Services(broker.bootstrap_servers, os.environ.get("REDIS_URL") or redis.redis_url, None, "local")
        try:
            settings = await make_settings(services, partitions=1)
            async with running_worker(settings, embedder) as worker:
                await produce(settings, [event(f"a{i}", f"before the restart {i}") for i in range(20)])
                await until(lambda: worker.stats.processed == 20, timeout=60, what="first events")
                await until(lambda: sum(worker.lag_records().values()) == 0, timeout=30, what="the commit")
                broker.restart()
                await until(
                    lambda: any("the broker lost its state" in r.getMessage() for r in caplog.records),
                    timeout=120, what="the lost-state error",
                )
                assert worker._consumer.assignment()  # rejoined
                assert not worker._stop.is_set()  # still running
        finally:
            if redis is not None:
                redis.close()


async def test_sigterm_with_the_broker_gone_exits_within_the_deadline_and_says_what_is_left(services, tmp_path):
    """The final commit cannot reach the broker: the drain deadline still holds, the exit is clean."""
    from support import Services

    deadline = 6.0
    with LocalBroker() as broker:
        own = Services(broker.bootstrap_servers, services.redis_url, services.qdrant_url, "local")
        settings = await make_settings(own, partitions=2)
        await produce(settings, [event(f"id-{i}", f"a text to embed before the outage {i}") for i in range(3000)])
        store, log = tmp_path / "qdrant", tmp_path / "worker.log"
        process = start_worker(worker_env(settings, store, EMBEDWORKER_SHUTDOWN_TIMEOUT_SECONDS=str(deadline)), log)
        await until(lambda: _committed_sync(settings) >= 50, timeout=120, what="some progress", interval=0.3)
        broker.stop()
        await asyncio.sleep(1.0)  # let the worker notice the outage; a timer, not synchronization
        process.send_signal(signal.SIGTERM)
        started = time.monotonic()
        code = process.wait(timeout=60)
        took = time.monotonic() - started
    text = log.read_text()
    assert code == 0, text[-3000:]
    assert took < deadline + 8, f"exit took {took:.1f}s with a {deadline}s deadline"
    assert "Traceback" not in text, text[-3000:]
    assert "the next owner replays them" in text or "stopped cleanly" in text
    noise = [line for line in text.splitlines() if "aiokafka" in line or "Unable connect" in line or "Unable to update metadata" in line]
    assert len(noise) <= 10, f"{len(noise)} aiokafka lines for one outage:\n" + "\n".join(noise[:20])
    print(f"\nSIGTERM with the broker gone: exit 0 after {took:.1f}s (deadline {deadline}s), {len(noise)} aiokafka log lines")


async def test_unreachable_broker_is_one_clear_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBEDWORKER_")}
    env.update(EMBEDWORKER_BOOTSTRAP_SERVERS=f"127.0.0.1:{free_port()}", EMBEDWORKER_METRICS_PORT="0", HF_HUB_OFFLINE="1",
               EMBEDWORKER_QDRANT_PATH=str(tmp_path / "q"))
    done = await asyncio.to_thread(subprocess.run, [EMBEDWORKER, "run"], env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert "cannot reach Kafka" in done.stderr.strip().splitlines()[-1]


async def test_secrets_never_appear_in_logs_or_errors(services, tmp_path):
    secret_password, secret_key = "hunter2-kafka-SECRET", "qdrant-key-SECRET"
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBEDWORKER_")}
    env.update(
        EMBEDWORKER_BOOTSTRAP_SERVERS=f"127.0.0.1:{free_port()}",
        EMBEDWORKER_KAFKA_SECURITY_PROTOCOL="SASL_PLAINTEXT",
        EMBEDWORKER_KAFKA_SASL_USERNAME="svc",
        EMBEDWORKER_KAFKA_SASL_PASSWORD=secret_password,
        EMBEDWORKER_REDIS_URL=f"redis://:redis-pass-SECRET@127.0.0.1:{free_port()}/0",
        EMBEDWORKER_QDRANT_PATH=str(tmp_path / "q"),
        EMBEDWORKER_QDRANT_API_KEY=secret_key,
        EMBEDWORKER_METRICS_PORT="0",
        EMBEDWORKER_LOG_LEVEL="DEBUG",
        HF_HUB_OFFLINE="1",
    )
    done = await asyncio.to_thread(subprocess.run, [EMBEDWORKER, "run"], env=env, capture_output=True, text=True, timeout=180)
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert "SECRET" not in output
    from streams.config import load_settings

    settings = load_settings(environ=env)
    assert "SECRET" not in repr(settings) and "SECRET" not in str(settings)
    bad = dict(env, EMBEDWORKER_REDIS_URL="http://:pw-SECRET@host")
    done = await asyncio.to_thread(subprocess.run, [EMBEDWORKER, "run"], env=bad, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "SECRET" not in done.stderr and "EMBEDWORKER_REDIS_URL" in done.stderr
