"""Many tenants on one worker (`EMBEDWORKER_TENANT_FROM`, the payload layout): real broker, Redis, model, stores.

Two tenants over the same ids, then fifty under SIGKILLs: each tenant's documents land in its own
space (point ids and the `tenant` field), deletes of one tenant never touch another's `doc-1`,
the cache scope hides cross-tenant hits, `search --tenant` returns only that tenant's documents,
and a record without a valid tenant is a dead letter.
"""

from __future__ import annotations

import random
from typing import Any

import orjson
import pytest

from schemas import point_id, tenant_key
from streams.assembly import build_sink
from streams.commands.search import query_sink
from streams.metrics import Metrics
from test_faults import _no_worker_outlives_its_test, worker_env  # noqa: F401  (the fixture: no worker outlives its test)
from support import make_cache, make_settings, make_store, produce, read_topic, running_worker, until

pytestmark = pytest.mark.integration


def tenant_event(tenant: str | None, doc_id: str, text: str) -> bytes:
    body: dict[str, Any] = {"id": doc_id, "text": text}
    if tenant is not None:
        body["tenant"] = tenant
    return orjson.dumps(body)


async def stored(store) -> dict[tuple[str | None, str], dict[str, Any]]:
    return {(p.payload.get("tenant"), p.payload["id"]): {**p.payload, "_point": p.id} for p in await store.points(with_vectors=False)}


@pytest.mark.parametrize("kind", ["edge", "qdrant-memory"])
async def test_two_tenants_share_ids_but_never_a_document_a_delete_or_a_cache_hit(services, embedder, tmp_path, kind):
    settings = await make_settings(services, partitions=2, tenant_from="tenant", batch_max_wait_ms=20)
    store = make_store(kind, tmp_path / "q", settings.collection)
    store = store.for_collection(settings.collection)
    metrics = Metrics()
    try:
        async with running_worker(settings, embedder, sink=store, cache=make_cache(settings, metrics), metrics=metrics) as worker:
            same_text = "Invoices are generated on the first business day of the month."
            await produce(settings, [tenant_event("acme", "doc-1", "Acme's first document about espresso machines."),
                                     tenant_event("acme", "doc-2", same_text)],
                          keys=[b"acme/doc-1", b"acme/doc-2"])
            await until(lambda: worker.stats.processed == 2, "acme's documents", timeout=60)
            await produce(settings, [tenant_event("globex", "doc-1", "Globex's first document about road repairs."),
                                     tenant_event("globex", "doc-2", same_text)],
                          keys=[b"globex/doc-1", b"globex/doc-2"])
            await until(lambda: worker.stats.processed == 4, "globex's documents", timeout=60)
            docs = await stored(store)
            assert set(docs) == {("acme", "doc-1"), ("acme", "doc-2"), ("globex", "doc-1"), ("globex", "doc-2")}
            assert docs[("acme", "doc-1")]["_point"] == point_id(tenant_key("acme", "doc-1"))
            assert docs[("acme", "doc-1")]["_point"] != docs[("globex", "doc-1")]["_point"]
            assert docs[("globex", "doc-1")]["text"].startswith("Globex")

            records = await read_topic(settings, settings.output_topic, expect=4)
            assert sorted(r.key for r in records) == [b"acme/doc-1", b"acme/doc-2", b"globex/doc-1", b"globex/doc-2"]
            results = [orjson.loads(r.value) for r in records]
            by_doc = {(r["tenant"], r["id"]): r for r in results}
            assert by_doc[("acme", "doc-2")]["cached"] is False
            # Globex sent the text acme had embedded: with the cache scoped per tenant, nothing tells it so.
            assert by_doc[("globex", "doc-2")]["cached"] is False

            # A tombstone names its tenant in the key; an update of acme's doc-2 leaves globex's alone.
            await produce(settings, [None, tenant_event("acme", "doc-2", "Acme changed its second document.")],
                          keys=[b"acme/doc-1", b"acme/doc-2"])
            await until(lambda: worker.stats.processed == 6, "the delete and the update", timeout=60)
            docs = await stored(store)
            assert set(docs) == {("acme", "doc-2"), ("globex", "doc-1"), ("globex", "doc-2")}
            assert docs[("acme", "doc-2")]["text"] == "Acme changed its second document."
            assert docs[("globex", "doc-2")]["text"] == same_text

            hits = await query_sink(store.for_tenant("globex"), "espresso machines", limit=5, embedder=embedder)
            assert hits and {h.payload["tenant"] for h in hits} == {"globex"}
            hits = await query_sink(store.for_tenant("acme"), "road repairs", limit=5, embedder=embedder)
            assert {h.payload["tenant"] for h in hits} == {"acme"}

            # No tenant, a bad one, a tombstone whose key names none: dead letters, nothing stored.
            await produce(settings, [tenant_event(None, "doc-9", "no tenant"), tenant_event("bad tenant!", "doc-9", "x"), None],
                          keys=[b"doc-9", b"x/doc-9", b"doc-9"])
            dead = [orjson.loads(r.value) for r in await read_topic(settings, settings.dlq_topic, expect=3)]
            assert sorted(d["error"]["type"] for d in dead) == ["invalid_tenant", "missing_tenant", "missing_tenant"]
            assert len(await stored(store)) == 3
            assert metrics.registry.get_sample_value("embedworker_tenant_messages_total", {"tenant": "acme"}) == 4
            assert metrics.registry.get_sample_value("embedworker_tenant_messages_total", {"tenant": "globex"}) == 2
            assert metrics.registry.get_sample_value("embedworker_tenant_latency_seconds_count", {"tenant": "globex"}) == 2
    finally:
        await store.close()


async def test_a_global_cache_scope_shares_vectors_across_tenants(services, embedder):
    settings = await make_settings(services, partitions=1, tenant_from="header:x-tenant", cache_scope="global",
                                   batch_max_wait_ms=20)
    text = "A text two tenants both send, word for word."
    async with running_worker(settings, embedder) as worker:
        await produce(settings, [tenant_event(None, "doc-1", text)], keys=[b"acme/doc-1"], headers=[[("x-tenant", b"acme")]])
        await until(lambda: worker.stats.processed == 1, "acme's document", timeout=60)
        await produce(settings, [tenant_event(None, "doc-1", text)], keys=[b"globex/doc-1"], headers=[[("x-tenant", b"globex")]])
        await until(lambda: worker.stats.processed == 2, "globex's document", timeout=60)
    results = {r["tenant"]: r for r in (orjson.loads(x.value) for x in await read_topic(settings, settings.output_topic, expect=2))}
    assert results["acme"]["cached"] is False and results["globex"]["cached"] is True  # the documented side channel


def test_search_needs_a_tenant_when_tenants_are_configured(capsys, clean_cli_state, tmp_path):
    from support import run_cli

    code, _, err = run_cli(capsys, "search", "anything", "--qdrant-path", str(tmp_path), "--tenant-from", "tenant")
    assert code != 0 and "--tenant" in err
    code, _, err = run_cli(capsys, "search", "anything", "--qdrant-path", str(tmp_path), "--tenant-from", "tenant",
                           "--tenant", "no/slash")
    assert code != 0 and "tenant" in err


async def test_fifty_tenants_under_sigkills_each_tenant_id_holds_its_last_event(services, embedder, tmp_path):
    """The mirror property per (tenant, id): 50 tenants over the same 8 ids, upserts, updates and deletes
    (tombstones keyed <tenant>/<id>), worker processes SIGKILLed three times."""
    from test_mirror import run_with_kills

    rng = random.Random(5)
    tenants, ids = [f"t{n:02d}" for n in range(50)], [f"doc-{i}" for i in range(8)]
    last: dict[tuple[str, str], str | None] = {}
    values, keys = [], []
    for n in range(1600):
        tenant, doc_id = rng.choice(tenants), rng.choice(ids)
        if last.get((tenant, doc_id)) is not None and rng.random() < 0.15:
            values.append(None)
            last[(tenant, doc_id)] = None
        else:
            text = f"{tenant} {doc_id} revision {n}: " + " ".join(rng.choice(["tea", "rail", "tax", "kiln", "moss"]) for _ in range(6))
            values.append(tenant_event(tenant, doc_id, text))
            last[(tenant, doc_id)] = text
        keys.append(f"{tenant}/{doc_id}".encode())
    settings = await make_settings(services, partitions=3, tenant_from="tenant")
    await produce(settings, values, keys=keys)
    store_path, log = tmp_path / "qdrant", tmp_path / "worker.log"
    env = worker_env(settings, store_path, EMBEDWORKER_TENANT_FROM="tenant", EMBEDWORKER_QDRANT_ENGINE="edge")
    await run_with_kills(settings, env, log, total=len(values), kills=3, rng=rng)
    store = build_sink(settings.replace(qdrant_path=str(store_path), qdrant_engine="edge"))
    try:
        docs = await stored(store)
    finally:
        await store.close()
    stale = [k for k, text in last.items() if text is not None and (k not in docs or docs[k].get("text") != text)]
    resurrected = [k for k, text in last.items() if text is None and k in docs]
    assert not stale and not resurrected, (stale[:5], resurrected[:5])
    assert set(docs) == {k for k, text in last.items() if text is not None}
    print(f"\ntenants under kills: {len(values)} events, {len(tenants)} tenants x {len(ids)} shared ids, "
          f"{sum(t is None for t in last.values())} deleted, 3 SIGKILLs, stale 0, resurrected 0")


async def test_a_tenant_over_its_quota_is_delayed_never_dropped_while_others_pass(services, embedder, tmp_path):
    quotas = tmp_path / "quotas.json"
    quotas.write_text('{"slow": 150}')  # ~10 of these short texts a second
    settings = await make_settings(services, partitions=2, tenant_from="tenant", tenant_quotas_file=str(quotas),
                                   batch_max_wait_ms=20)
    async with running_worker(settings, embedder) as worker:
        await produce(settings, [tenant_event("slow", f"s{i}", f"slow tenant note {i} about kilns") for i in range(40)],
                      keys=[f"slow/s{i}".encode() for i in range(40)])
        await until(lambda: worker.stats.processed >= 1, "the first slow result", timeout=60)
        await produce(settings, [tenant_event("free", f"f{i}", f"free tenant note {i} about moss") for i in range(10)],
                      keys=[f"free/f{i}".encode() for i in range(10)])
        await until(lambda: worker.stats.processed == 50, "every event of both tenants", timeout=120)
    results = [(orjson.loads(r.value), r.timestamp) for r in await read_topic(settings, settings.output_topic, expect=50)]
    last = {tenant: max(ts for body, ts in results if body["tenant"] == tenant) for tenant in ("slow", "free")}
    assert len({(b["tenant"], b["id"]) for b, _ in results}) == 50
    assert last["free"] < last["slow"]  # the free tenant, sent later, finished while the slow one waited for its bucket


async def test_a_collection_per_tenant_and_a_new_tenant_past_the_limit_is_a_dead_letter(services, embedder, tmp_path):
    from streams.commands.search import search

    settings = await make_settings(services, partitions=1, tenant_from="tenant", tenancy="collection",
                                   max_tenant_collections=2, qdrant_path=str(tmp_path / "q"), qdrant_engine="edge",
                                   batch_max_wait_ms=20)
    store = build_sink(settings)
    try:
        async with running_worker(settings, embedder, sink=store) as worker:
            await produce(settings, [tenant_event("acme", "doc-1", "Acme's kettle manual."),
                                     tenant_event("globex", "doc-1", "Globex's road survey."),
                                     tenant_event("initech", "doc-1", "Initech's third tenant text."),
                                     tenant_event("acme", "doc-2", "Acme's second document."),
                                     None],
                          keys=[b"acme/doc-1", b"globex/doc-1", b"initech/doc-1", b"acme/doc-2", b"globex/doc-1"])
            await until(lambda: worker.stats.processed + worker.stats.dead_letters == 5, "every record", timeout=60)
            acme = await stored(store.for_collection(f"{settings.collection}_acme"))
            globex = await stored(store.for_collection(f"{settings.collection}_globex"))
            assert set(acme) == {("acme", "doc-1"), ("acme", "doc-2")} and globex == {}  # globex's doc-1 deleted again
            assert not await store.collection_exists(f"{settings.collection}_initech")
        dead = [orjson.loads(r.value) for r in await read_topic(settings, settings.dlq_topic, expect=1)]
        assert [d["error"]["type"] for d in dead] == ["tenant_limit"]
    finally:
        await store.close()
    hits = await search(settings, "kettle", limit=3, tenant="acme", embedder=embedder)
    assert {h.payload["tenant"] for h in hits} == {"acme"}
