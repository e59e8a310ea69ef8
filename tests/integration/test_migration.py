"""A model change without downtime: `embedworker migrate` while a stream of upserts, updates and deletes runs.

Real broker, Redis, the bundled model and, as the model to migrate to, the bundled model cut to
128 dimensions (its vectors visibly change: another size, renormalized). The worker and its
migration follower run in this process so that a reader can poll through the alias on the same
embedded store (an embedded path is one process's) while `cutover` and `rollback` flip it.
"""

from __future__ import annotations

import asyncio
import random
import signal
import subprocess

import numpy as np
import pytest

from processors.sink import versioned_collection
from streams import migration
from streams.assembly import assemble, build_embedder, build_sink
from streams.commands.common import UserError
from streams.metrics import Metrics
from support import event, make_cache, make_settings, produce, until

NEW_DIMENSIONS = 128
STABLE = [f"stable-{i}" for i in range(20)]
"""Written once before the migration and never touched again: a reader must always find them."""
MUTABLE = [f"doc-{i}" for i in range(30)]


def texts_of(rng: random.Random, doc_id: str, n: int) -> str:
    words = ["invoice", "refund", "espresso", "council", "budget", "flour", "password", "router", "garden", "violin"]
    return f"{doc_id} revision {n}: " + " ".join(rng.choice(words) for _ in range(8))


class Stream:
    """Upserts, updates and deletes of `MUTABLE` (key = id), remembering each id's last event."""

    def __init__(self, settings, seed: int = 7) -> None:
        self.settings, self.rng = settings, random.Random(seed)
        self.last: dict[str, str | None] = {}
        self.sent = 0
        self.stopping = asyncio.Event()

    async def round(self, size: int = 20) -> None:
        values, keys = [], []
        for _ in range(size):
            doc_id = self.rng.choice(MUTABLE)
            if self.last.get(doc_id) is not None and self.rng.random() < 0.2:
                values.append(None)  # a tombstone
                self.last[doc_id] = None
            else:
                text = texts_of(self.rng, doc_id, self.sent)
                values.append(event(doc_id, text))
                self.last[doc_id] = text
            keys.append(doc_id.encode())
            self.sent += 1
        await produce(self.settings, values, keys=keys)

    async def run(self) -> None:
        while not self.stopping.is_set():
            await self.round()
            try:
                await asyncio.wait_for(self.stopping.wait(), 0.3)  # a steady trickle, not a flood
            except asyncio.TimeoutError:
                pass


async def holds_last_events(store, collection: str, expected: dict[str, str | None], dim: int) -> bool:
    stored = await retrieve_docs(store.for_collection(collection))
    for doc_id, text in expected.items():
        if text is None:
            if doc_id in stored:
                return False
        elif doc_id not in stored or stored[doc_id][1].get("text") != text or len(stored[doc_id][0]) != dim:
            return False
    return True


async def retrieve_docs(store) -> dict[str, tuple[np.ndarray, dict]]:
    return {p.payload["id"]: (p.vector, p.payload) for p in await store.points(with_vectors=True)}


@pytest.mark.parametrize("engine", ["edge", "local"])
async def test_a_model_change_under_a_stream_loses_nothing_and_readers_never_miss_a_document(
    services, embedder, tmp_path, engine
):
    settings = await make_settings(
        services, partitions=2, qdrant_path=str(tmp_path / "q") if engine == "edge" else "", qdrant_engine=engine,
        versioned_collections=True, batch_max_wait_ms=20,
    )
    store = build_sink(settings)
    metrics = Metrics()
    new_settings = settings.replace(dimensions=NEW_DIMENSIONS)
    new_model = build_embedder(new_settings)
    stream = Stream(settings)
    missing_during_flips: list[int] = []
    try:
        async with assemble(settings, embedder=embedder, sink=store, cache=make_cache(settings, metrics), metrics=metrics) as parts:
            worker = parts.worker(sink=await migration.pinned_sink(settings, store))
            follower = migration.MigrationFollower(settings, parts, poll_seconds=0.2, main=worker)
            tasks = [asyncio.create_task(worker.run()), asyncio.create_task(follower.run())]
            try:
                await _migrate_under_a_stream(settings, store, embedder, new_model, stream, follower, tasks, metrics,
                                              missing_during_flips)
            finally:
                stream.stopping.set()
                worker.request_stop()
                follower.request_stop()
                await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        await store.close()


async def _migrate_under_a_stream(settings, store, embedder, new_model, stream, follower, tasks, metrics, missing_during_flips):
    alias = settings.collection
    await produce(settings, [event(i, f"{i}: a document that never changes, about {i.split('-')[1]} things") for i in STABLE],
                  keys=[i.encode() for i in STABLE])
    await stream.round(60)
    live = versioned_collection(alias, settings.model)

    async def stable_visible() -> int:
        found = await retrieve_docs(store)  # through the alias, as a reader queries
        return sum(1 for i in STABLE if i in found)

    await until(lambda: _eq(stable_visible(), len(STABLE)), "the stable documents", timeout=60)
    streaming = asyncio.create_task(stream.run())

    started = await migration.start(settings, model=settings.model, dimensions=NEW_DIMENSIONS, store=store)
    assert started.phase == "backfill" and started.old.collection == live
    assert started.new.collection == versioned_collection(alias, f"{settings.model}-{NEW_DIMENSIONS}d")
    again = await migration.start(settings, model=settings.model, dimensions=NEW_DIMENSIONS, store=store)
    assert again.new == started.new  # safe to re-run
    with pytest.raises(UserError, match="cutover refused|needs"):
        await migration.cutover(settings, store=store)

    done, report = await migration.backfill(settings, store=store, embedder=new_model)
    assert done.phase == "dual" and report.embedded >= len(STABLE)
    await until(lambda: follower.shadow is not None, "the shadow worker", timeout=60)

    async def passes() -> bool:
        checked = await migration.check(settings, store=store, embedders=(embedder, new_model), sample=20)
        return checked.passed and checked.missing == 0

    await until(passes, "a passing check", timeout=120, interval=0.5)

    async def reader(until_done: asyncio.Event) -> None:
        while not until_done.is_set():
            missing_during_flips.append(len(STABLE) - await stable_visible())

    flipping = asyncio.Event()
    reading = asyncio.create_task(reader(flipping))
    await migration.cutover(settings, store=store)
    assert await store.alias_target(alias) == started.new.collection
    await until(lambda: _vector_size_is(store, NEW_DIMENSIONS), "reads through the alias return the new vectors")
    await stream.round()
    await migration.rollback(settings, store=store)
    assert await store.alias_target(alias) == live
    await stream.round()
    await migration.cutover(settings, store=store)
    flipping.set()
    await reading
    assert len(missing_during_flips) > 0 and max(missing_during_flips) == 0

    stream.stopping.set()
    await streaming
    expected = {**{i: None for i in MUTABLE}, **stream.last}
    await until(lambda: holds_last_events(store, started.new.collection, expected, NEW_DIMENSIONS),
                "the new collection holds every id's last event", timeout=120, interval=0.5)
    await until(lambda: holds_last_events(store, live, expected, embedder.dim),
                "the old collection holds every id's last event", timeout=120, interval=0.5)
    state = await migration.status(settings, store=store)
    assert state["phase"] == "cutover" and state["serves"] == started.new.collection
    assert metrics.migration_shadow_processed._value.get() > 0
    assert metrics.migration_phase.labels(phase="cutover")._value.get() == 1

    finished = await migration.finish(settings, store=store, drop_old=True)
    assert finished.served == finished.new
    await until(lambda: all(t.done() for t in tasks[:1]), "the old-model worker stops after finish", timeout=60)
    follower.request_stop()
    await asyncio.gather(*tasks)
    assert follower.failure and f"EMBEDWORKER_DIMENSIONS={NEW_DIMENSIONS}" in follower.failure
    assert not await store.collection_exists(live)
    stored = await retrieve_docs(store)
    assert {i for i, t in expected.items() if t is not None} | set(STABLE) == set(stored)


async def _eq(value, expected) -> bool:
    return (await value) == expected


async def _vector_size_is(store, size: int) -> bool:
    points = await store.points(with_vectors=True)
    return bool(points) and all(len(p.vector) == size for p in points)


async def test_a_hostile_migration_record_is_refused_with_one_line(tmp_path):
    store = build_sink(await _edge_settings(tmp_path))
    try:
        await store.write_record(migration.record_key("texts"), {"alias": "texts", "phase": "dual", "old": {}, "new": "x"})
        with pytest.raises(Exception, match="migration record"):
            await migration.read_migration(store, "texts")
        await store.write_record(migration.record_key("texts"), {"phase": "rm -rf", "alias": "texts"})
        with pytest.raises(Exception, match="phase"):
            await migration.read_migration(store, "texts")
    finally:
        await store.close()


async def _edge_settings(tmp_path):
    from streams.config import load_settings

    return load_settings({"qdrant_path": str(tmp_path / "q"), "qdrant_engine": "edge", "collection": "texts"}, environ={})


# ---- the CLI, worker processes and SIGKILLs --------------------------------------------------


def _migrate(env: dict[str, str], *args: str) -> subprocess.Popen:
    from test_faults import EMBEDWORKER

    return subprocess.Popen([EMBEDWORKER, "migrate", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(process: subprocess.Popen, what: str) -> str:
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, f"{what}: {err[-2000:]}"
    return out


async def test_migrate_commands_and_sigkills_during_backfill_and_cutover_on_qdrant_edge(services, embedder, tmp_path):
    """The runbook as an operator runs it on an embedded path (one process at a time opens a shard):
    the worker SIGKILLed, `migrate start`, `backfill` SIGKILLed once it has written and run again, the worker
    dual-writing, `cutover` beside it (the alias record is a file) and the worker SIGKILLed right after;
    the stream goes on throughout, and at the end both collections hold each id's last event."""
    from test_faults import _workers, start_worker, worker_env
    from test_mirror import _committed_sync_n

    settings = await make_settings(services, partitions=2, qdrant_engine="edge", versioned_collections=True)
    store_path = tmp_path / "q"
    env = worker_env(settings, store_path, EMBEDWORKER_QDRANT_ENGINE="edge", EMBEDWORKER_VERSIONED_COLLECTIONS="1")
    log_path = tmp_path / "worker.log"
    stream = Stream(settings, seed=11)
    big = [event(f"bulk-{i}", f"bulk document {i} about " + " ".join(["invoices", "coffee", "roads", "flour"][j % 4] for j in range(i % 7 + 3)))
           for i in range(1500)]
    await produce(settings, big, keys=[f"bulk-{i}".encode() for i in range(1500)])
    await stream.round(100)
    total = len(big) + stream.sent
    kills = 0
    try:
        worker = start_worker(env, log_path)
        await until(lambda: _committed_sync_n(settings, 2) >= total // 2, "half the backlog", timeout=240, interval=0.3)
        worker.send_signal(signal.SIGKILL)
        worker.wait()
        kills += 1
        worker = start_worker(env, log_path)
        await until(lambda: _committed_sync_n(settings, 2) >= total, "the backlog", timeout=240, interval=0.3)
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=60) == 0, log_path.read_text()[-3000:]
        await stream.round()  # waits in Kafka while no worker runs: the shadow group replays it

        out = _finish(_migrate(env, "start", "--model", settings.model, "--dimensions", str(NEW_DIMENSIONS)), "start")
        assert "phase backfill" in out
        new_collection = versioned_collection(settings.collection, f"{settings.model}-{NEW_DIMENSIONS}d")
        backfilling = _migrate(env, "backfill", "--batch-size", "16")
        await until(lambda: backfilling.poll() is not None or _backfilled(store_path, settings.collection) > 0,
                    "the backfill to record progress", timeout=120, interval=0.05)
        assert backfilling.poll() is None, "the backfill ended before it could be killed"
        backfilling.send_signal(signal.SIGKILL)
        backfilling.wait()
        kills += 1
        out = _finish(_migrate(env, "backfill"), "backfill again")
        assert "dual writes begin" in out

        worker = start_worker(env, log_path)
        await stream.round()
        await until(lambda: "dual writes:" in log_path.read_text(), "the shadow worker", timeout=120, interval=0.3)
        shadow = settings.replace(group_id=f"{settings.group_id}.migrate.1")
        sent = len(big) + stream.sent
        await until(lambda: _committed_sync_n(shadow, 2) >= sent and _committed_sync_n(settings, 2) >= sent,
                    "both groups to catch up", timeout=240, interval=0.3)
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=60) == 0, log_path.read_text()[-3000:]
        checked = _migrate(env, "check", "--sample", "20")
        out, err = checked.communicate(timeout=300)
        assert checked.returncode == 0 and "check: PASS" in out, out + err

        worker = start_worker(env, log_path)
        await until(lambda: log_path.read_text().count("dual writes:") >= 2, "the shadow worker again", timeout=120, interval=0.3)
        out = _finish(_migrate(env, "cutover"), "cutover")
        assert new_collection in out
        await stream.round()
        worker.send_signal(signal.SIGKILL)  # right after the flip, with dual writes in flight
        worker.wait()
        kills += 1
        await stream.round()
        worker = start_worker(env, log_path)
        sent = len(big) + stream.sent
        await until(lambda: _committed_sync_n(shadow, 2) >= sent and _committed_sync_n(settings, 2) >= sent,
                    "both groups to catch up after the kill", timeout=240, interval=0.3)
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=60) == 0, log_path.read_text()[-3000:]
    finally:
        for process in _workers:
            if process.poll() is None:
                process.kill()
                process.wait()

    store = build_sink(settings.replace(qdrant_path=str(store_path)))
    try:
        assert await store.alias_target(settings.collection) == new_collection
        expected = {**{i: None for i in MUTABLE}, **stream.last}
        live = versioned_collection(settings.collection, settings.model)
        assert await holds_last_events(store, new_collection, expected, NEW_DIMENSIONS)
        assert await holds_last_events(store, live, expected, embedder.dim)
        stale = 0
        for name, dim in ((new_collection, NEW_DIMENSIONS), (live, embedder.dim)):
            docs = await retrieve_docs(store.for_collection(name))
            assert all(f"bulk-{i}" in docs for i in range(1500)), name
            stale += sum(1 for i, t in expected.items() if (t is None) != (i not in docs))
        state = await migration.status(settings.replace(qdrant_path=str(store_path)), store=store)
        assert state["phase"] == "cutover" and state["shadow_lag"] == 0
        print(f"\nmigration under kills: {len(big) + stream.sent} events, {len(expected) + 1500} ids, {kills} SIGKILLs "
              f"(worker x2, backfill x1), stale 0, backfill {state['backfill']}")
    finally:
        await store.close()
    from streams.commands.search import search

    # After the cutover a query is embedded with the served model (the environment still names the old one).
    hits = await search(settings.replace(qdrant_path=str(store_path)), "bulk document 7 about invoices", limit=3)
    assert hits and len(hits) == 3


def _backfilled(path, alias: str) -> int:
    """How far a backfill got, as its record says (`control.json` is replaced atomically)."""
    import json

    try:
        record = json.loads((path / "control.json").read_text())
    except FileNotFoundError:
        return 0
    return int(json.loads(record.get(migration.record_key(alias), "{}")).get("backfill", {}).get("embedded") or 0)


async def test_a_failing_new_model_never_stalls_the_live_collection(services, embedder, tmp_path):
    """The shadow's model cannot load: the follower counts it and tries again later, while the live
    worker goes on writing and committing every event."""
    settings = await make_settings(services, partitions=1, qdrant_path=str(tmp_path / "q"), qdrant_engine="edge",
                                   versioned_collections=True, batch_max_wait_ms=20)
    store = build_sink(settings)
    metrics = Metrics()
    try:
        async with assemble(settings, embedder=embedder, sink=store, cache=make_cache(settings, metrics), metrics=metrics) as parts:
            worker = parts.worker(sink=await migration.pinned_sink(settings, store))
            await produce(settings, [event("a", "first")], keys=[b"a"])
            run = asyncio.create_task(worker.run())
            follower = migration.MigrationFollower(settings, parts, poll_seconds=0.1, main=worker)
            following = asyncio.create_task(follower.run())
            try:
                await until(lambda: _has(store, "a"), "the first document", timeout=60)
                live = await store.alias_target(settings.collection)
                broken = migration.Migration(
                    alias=settings.collection, phase="dual", old=migration.Side.of(settings, live),
                    new=migration.Side(f"{settings.collection}__broken__1", str(tmp_path / "no-such-model")),
                    shadow_group=f"{settings.group_id}.migrate.1",
                )
                await migration.save(store, broken)
                await until(lambda: metrics.migration_errors._value.get() >= 1, "the shadow's failure to be counted", timeout=60)
                await produce(settings, [event(f"later-{i}", f"written while the shadow fails {i}") for i in range(20)],
                              keys=[f"later-{i}".encode() for i in range(20)])
                await until(lambda: _has(store, *[f"later-{i}" for i in range(20)]), "the live collection to go on", timeout=60)
                assert metrics.migration_phase.labels(phase="dual")._value.get() == 1
                assert follower.shadow is None and not run.done()
            finally:
                worker.request_stop()
                follower.request_stop()
                await asyncio.gather(run, following)
    finally:
        await store.close()


async def _has(store, *ids: str) -> bool:
    from processors.errors import SinkConfigError

    try:
        found = await retrieve_docs(store)
    except SinkConfigError:  # not created yet
        return False
    return all(i in found for i in ids)


def test_a_quantization_only_migration_tells_its_sides_apart():
    from streams.config import load_settings

    old = load_settings({"collection": "texts"}, environ={})
    new = old.replace(quantization="int8")
    record = migration.Migration(alias="texts", phase="finished", old=migration.Side.of(old, "texts__m__1"),
                                 new=migration.Side.of(new, "texts__m__2"), shadow_group="g.migrate.1", outcome="new")
    assert record.side_of(old) == "old" and record.side_of(new) == "new"  # a restarted int8 worker is not stopped


async def test_flips_follow_the_alias_when_a_step_died_between_the_flip_and_its_record(tmp_path):
    """The alias is switched before the record is saved: a step killed in between leaves the alias ahead of the record.
    Running the step again, or `finish`, goes by what the alias names."""
    settings = await _edge_settings(tmp_path)
    store = build_sink(settings)
    try:
        for name in ("texts__m__1", "texts__m__2"):
            await store.for_collection(name).ensure_collection(4)
        await store.switch_alias("texts", "texts__m__1")
        record = migration.Migration(alias="texts", phase="dual", old=migration.Side("texts__m__1", "m"),
                                     new=migration.Side("texts__m__2", "m", 4), shadow_group="g.migrate.1",
                                     last_check={"passed": True})
        await migration.save(store, record)
        await store.switch_alias("texts", "texts__m__2")  # a cutover killed right after its flip
        done = await migration.finish(settings, store=store)
        assert done.outcome == "new" and done.served == done.new  # not "old", as the phase alone would say
        await store.for_collection("plain").ensure_collection(4)
        with pytest.raises(UserError, match="not an alias"):  # a plain collection is never adopted under its own name
            await migration.start(settings.replace(collection="plain"), model="m2", store=store)
    finally:
        await store.close()


async def test_a_rerun_cutover_saves_the_record_a_killed_one_did_not(tmp_path):
    settings = await _edge_settings(tmp_path)
    store = build_sink(settings)
    try:
        for name in ("texts__m__1", "texts__m__2"):
            await store.for_collection(name).ensure_collection(4)
        await store.switch_alias("texts", "texts__m__2")
        await migration.save(store, migration.Migration(
            alias="texts", phase="dual", old=migration.Side("texts__m__1", "m"), new=migration.Side("texts__m__2", "m", 4),
            shadow_group="g.migrate.1", last_check={"passed": True}))
        done = await migration.cutover(settings, store=store)
        assert done.phase == "cutover" and (await migration.read_migration(store, "texts")).phase == "cutover"
        back = await migration.rollback(settings, store=store)
        assert back.phase == "rolled_back" and await store.alias_target("texts") == "texts__m__1"
    finally:
        await store.close()
