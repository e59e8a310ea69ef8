"""Flow control, lag, rebalances and outages of the Kafka runtime, on real services."""

from __future__ import annotations


import orjson
import pytest

from doubles import FailingSink
from processors.pipeline import Backoff
from streams.devstack import LocalRedis
from streams.metrics import Metrics
from support import committed_offsets, event, make_cache, make_settings, make_sink, produce, read_topic, running_worker, until

pytestmark = pytest.mark.integration

POOL = [f"Support ticket {i}: the export to CSV times out after {i % 7 + 1} minutes on the dashboard." for i in range(200)]


async def test_sink_outage_pauses_commits_nothing_and_lag_matches_the_truth(services, embedder):
    settings = await make_settings(services, partitions=2, commit_interval_ms=100)
    failing = FailingSink(make_sink(settings))
    metrics = Metrics()
    async with running_worker(settings, embedder, sink=failing, metrics=metrics) as worker:
        worker.pipeline.sink_backoff = Backoff(base_seconds=0.05, cap_seconds=0.3)
        failing.failing = True
        await produce(settings, [event(f"id-{i}", POOL[i]) for i in range(120)], keys=[str(i).encode() for i in range(120)])
        await until(lambda: failing.failed_calls >= 3, timeout=60, what="failing upserts")
        await until(lambda: worker.flow.paused and "sink" in worker.flow.active, timeout=30, what="a pause for the sink")
        # Truth: nothing sunk, so nothing committed, and the exported lag is every produced record.
        assert sum((await committed_offsets(settings, 2)).values()) == 0
        await until(lambda: sum(worker.lag_records().values()) == 120, timeout=30, what="lag to reach the produced count")
        exported = sum(
            metrics.registry.get_sample_value("embedworker_consumer_lag_records", {"topic": settings.input_topic, "partition": str(p)}) or 0
            for p in range(2)
        )
        assert exported == 120
        assert metrics.registry.get_sample_value("embedworker_backpressure_paused") == 1
        assert metrics.registry.get_sample_value("embedworker_consumer_lag_seconds", {"topic": settings.input_topic, "partition": "0"}) > 0

        failing.failing = False
        await until(lambda: worker.stats.processed == 120, timeout=120, what="recovery")
        await until(lambda: sum(worker.lag_records().values()) == 0, timeout=30, what="lag back to 0")
        assert not worker.flow.paused
    assert sum((await committed_offsets(settings, 2)).values()) == 120
    assert await failing.count() == 120


async def test_redis_outage_mid_stream_degrades_and_recovers(services, embedder):
    redis = LocalRedis().start()
    try:
        settings = await make_settings(services, partitions=1, redis_url=redis.url)
        metrics = Metrics()
        sink = make_sink(settings)
        async with running_worker(settings, embedder, sink=sink, cache=make_cache(settings, metrics), metrics=metrics) as worker:
            await produce(settings, [event(f"a{i}", POOL[i]) for i in range(30)])
            await until(lambda: worker.stats.processed == 30, timeout=60, what="first pass")
            redis.stop()
            await produce(settings, [event(f"b{i}", POOL[30 + i]) for i in range(30)])
            await until(lambda: worker.stats.processed == 60, timeout=60, what="processing without Redis")
            errors = sum(metrics.registry.get_sample_value("embedworker_cache_errors_total", {"operation": op}) or 0 for op in ("get", "set"))
            assert errors >= 2
            redis.restart()
            # Texts of the first pass were cached before the outage, but the restarted Redis is
            # empty (no persistence); the ones embedded now are cached again and hit next time.
            await produce(settings, [event(f"c{i}", POOL[60 + i]) for i in range(10)])
            await until(lambda: worker.stats.processed == 70, timeout=60, what="processing after Redis returned")
            hits_before = worker.stats.cached
            await produce(settings, [event(f"d{i}", POOL[60 + i]) for i in range(10)])
            await until(lambda: worker.stats.processed == 80, timeout=60, what="cache hits after recovery")
            assert worker.stats.cached - hits_before == 10
        assert await sink.count() == 80
    finally:
        redis.stop()


async def test_two_workers_split_partitions_and_survive_one_dying(services, embedder):
    total = 3000
    settings = await make_settings(services, partitions=4, batch_max_messages=64, max_in_flight_batches=2)
    sink = make_sink(settings)
    await produce(settings, [event(f"id-{i}", POOL[i % len(POOL)] + f" #{i % 900}") for i in range(total)])
    async with running_worker(settings, embedder, sink=sink) as survivor:
        async with running_worker(settings, embedder, sink=sink) as victim:
            await until(lambda: len(survivor._consumer.assignment()) == 2 and len(victim._consumer.assignment()) == 2,
                             timeout=60, what="both workers to share the partitions")
            await until(lambda: victim.stats.processed >= 300, timeout=120, what="the victim to make progress")
            victim.abort()  # dies mid-stream: no drain, no final commit
        await until(lambda: len(survivor._consumer.assignment()) == 4, timeout=60, what="the survivor to take over")
        await until(lambda: sum(survivor.lag_records().values()) == 0 and len(survivor.lag_records()) == 4,
                         timeout=300, what="everything processed and committed")
    # Each id exactly one point: counted per payload id, not as a set of (deterministic) point ids.
    per_id: dict[str, int] = {}
    for point in await sink.points(with_vectors=False):
        per_id[point.payload["id"]] = per_id.get(point.payload["id"], 0) + 1
    assert per_id == {f"id-{i}": 1 for i in range(total)}
    assert sum((await committed_offsets(settings, 4)).values()) == total
    results = await read_topic(settings, settings.output_topic, expect=total)
    got = {orjson.loads(r.value)["id"] for r in results}
    assert got == {f"id-{i}" for i in range(total)}
    print(f"\ntwo workers: {len(results) - total} duplicate result events after the kill")


async def test_adaptive_batches_are_small_at_low_lag_and_large_at_high_lag(services, embedder):
    settings = await make_settings(services, partitions=1, lag_low=50, lag_high=1000, batch_min_messages=16, batch_max_messages=256)
    async with running_worker(settings, embedder) as worker:
        for i in range(20):  # a trickle: one event at a time
            await produce(settings, [event(f"t{i}", POOL[i])])
            await until(lambda: worker.stats.processed == i + 1, timeout=30, what="trickle event")
        trickle = list(worker.stats.batch_sizes)
        await produce(settings, [event(f"b{i}", POOL[i % 200] + f" {i}") for i in range(3000)])
        await until(lambda: worker.stats.processed == 3020, timeout=300, what="burst")
        burst = list(worker.stats.batch_sizes)[len(trickle):]
    assert max(trickle) <= 2
    assert max(burst) > 100
    print(f"\nbatch sizes: low lag max {max(trickle)}, high lag max {max(burst)} median {sorted(burst)[len(burst) // 2]}")
