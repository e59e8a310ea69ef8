"""Deficit round robin over tenants in the batcher (pure logic: no I/O)."""

from __future__ import annotations

import random

from streams.batching import Batcher, BatchPolicy

POLICY = BatchPolicy(min_messages=10, max_messages=10, min_tokens=10**6, max_tokens=10**6)


def fair(quantum: int = 10) -> Batcher:
    return Batcher(POLICY, tenant_of=lambda item: item[0], quantum_tokens=quantum)


def test_a_tenants_backlog_does_not_hold_back_anothers_events():
    batcher = fair()
    for i in range(100):
        batcher.add(("big", i), 10, 0.0)
    for i in range(3):
        batcher.add(("small", i), 10, 0.0)
    first = batcher.take(0.0)
    assert [i for t, i in first if t == "small"] == [0, 1, 2]
    plain = Batcher(POLICY)
    for i in range(100):
        plain.add(("big", i), 10, 0.0)
    plain.add(("small", 0), 10, 0.0)
    assert all(t == "big" for t, _ in plain.take(0.0))  # without fairness it waits behind the backlog


def test_every_item_leaves_once_each_tenant_in_its_order_and_batches_in_buffer_order():
    rng = random.Random(3)
    batcher = fair(quantum=7)
    added = []
    for n in range(400):
        item = (rng.choice("abcde"), n)
        added.append(item)
        batcher.add(item, rng.randint(1, 30), 0.0)
    taken = []
    while len(batcher):
        batch = batcher.take(0.0)
        assert batch and len(batch) <= POLICY.max_messages
        assert [n for _, n in batch] == sorted(n for _, n in batch)
        taken.extend(batch)
    assert sorted(taken, key=lambda x: x[1]) == added
    for tenant in "abcde":
        mine = [n for t, n in taken if t == tenant]
        assert mine == sorted(mine)


def test_shares_are_even_while_every_tenant_has_work():
    batcher = fair(quantum=10)
    for i in range(50):
        for tenant in ("a", "b"):
            batcher.add((tenant, i), 10, 0.0)
    counts = {"a": 0, "b": 0}
    for _ in range(4):
        for tenant, _ in batcher.take(0.0):
            counts[tenant] += 1
    assert counts == {"a": 20, "b": 20}


def test_an_item_larger_than_the_quantum_is_taken_and_one_tenant_is_plain_oldest_first():
    batcher = fair(quantum=1)
    batcher.add(("a", 0), 500, 0.0)
    batcher.add(("b", 0), 500, 0.0)
    assert {t for t, _ in batcher.take(0.0)} <= {"a", "b"} and len(batcher) < 2
    single = fair()
    for i in range(15):
        single.add(("only", i), 10, 0.0)
    assert single.take(0.0) == [("only", i) for i in range(10)]


def test_tenant_labels_stay_bounded_and_go_to_the_largest():
    from streams.tenants import OTHER, TenantLabels

    rng = random.Random(9)
    labels = TenantLabels(5, every=100)
    seen = set()
    for _ in range(20_000):
        tenant = "whale" if rng.random() < 0.3 else f"t{rng.randint(0, 999)}"
        seen.add(labels.label(tenant))
    assert len(seen) <= 6 and OTHER in seen and "whale" in seen
    assert labels.label(None) == OTHER


def test_a_tenant_over_its_quota_waits_while_the_others_go_and_nothing_is_dropped():
    from streams.quotas import TenantQuotas

    quotas = TenantQuotas(0, {"slow": 100})  # 100 tokens a second for `slow`, no quota for the rest
    batcher = Batcher(POLICY, tenant_of=lambda item: item[0], quantum_tokens=10, quotas=quotas)
    for i in range(30):
        batcher.add(("slow", i), 20, 0.0)
    for i in range(5):
        batcher.add(("free", i), 20, 0.0)
    first = batcher.take(0.0)
    assert [i for t, i in first if t == "free"] == [0, 1, 2, 3, 4]
    assert [i for t, i in first if t == "slow"] == [0, 1, 2, 3, 4]  # one second's bucket: 100 tokens, 5 events
    assert batcher.take(0.0) == []  # only `slow` is left and its bucket is empty: nothing starts, nothing is lost
    assert batcher.seconds_until_due(0.0) is not None
    later = batcher.take(0.5)  # half a second refills 50 tokens
    assert [i for _, i in later] == [5, 6, 7]
    taken, now = len(first) + len(later), 0.5
    while len(batcher):
        now += 0.2
        taken += len(batcher.take(now))
    assert taken == 35 and now >= 0.5 + (30 - 8) * 20 / 100 - 0.6  # the long-run rate is the quota


def test_quotas_file_is_validated(tmp_path):
    import pytest

    from streams.quotas import load_quotas

    good = tmp_path / "quotas.json"
    good.write_text('{"acme": 500, "globex": 0}')
    assert load_quotas(str(good)) == {"acme": 500.0, "globex": 0.0}
    for text, message in [('["acme"]', "object"), ('{"bad tenant": 5}', "1-64"), ('{"acme": -1}', "0 or more"), ("{", "JSON")]:
        bad = tmp_path / "bad.json"
        bad.write_text(text)
        with pytest.raises(ValueError, match=message):
            load_quotas(str(bad))


def test_a_tenant_field_cannot_be_read_from_debezium_rows_or_beside_key_ids():
    import pytest

    from streams.config import ConfigError, load_settings

    for extra in ({"input_format": "debezium"}, {"id_from": "key"}, {"id_from": "key.id"}):
        with pytest.raises(ConfigError, match="header"):
            load_settings({"tenant_from": "tenant", **extra}, environ={})
    assert load_settings({"tenant_from": "header:x-tenant", "input_format": "debezium"}, environ={}).tenant_from
