"""Events as they already are: mapped JSON topics and Debezium change events.

The decode tests are pure; the worker tests run the real `Worker` on the in-memory broker
with qdrant-client's engine. The Debezium events follow the documented Postgres connector
examples (create, snapshot read, update, delete, tombstone, truncate; both JSON envelopes).
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from streams.backends import TopicPartition
from hypothesis import given, settings as hypothesis_settings, strategies as st

from support import memory_settings, until, worker_on
from processors.sink import QdrantSink
from schemas import InvalidEvent, decode_input
from schemas.mapping import Mapping, decode_record, parse_mapping
from streams.backends.memory import MemoryBroker
from streams.config import ConfigError, load_settings

DEBEZIUM = parse_mapping(input_format="debezium", text_from="{title}\\n\\n{body}", metadata_from="lang")


def change(op: str, before: dict | None, after: dict | None, lsn: int, *, envelope: bool = False) -> bytes:
    payload = {"before": before, "after": after, "op": op, "ts_ms": 1_700_000_000_000 + lsn,
               "source": {"connector": "postgresql", "db": "kb", "table": "articles", "lsn": lsn, "ts_ms": 1_700_000_000_000}}
    if envelope:  # the JSON converter with schemas.enable=true
        return orjson.dumps({"schema": {"type": "struct", "name": "kb.public.articles.Envelope"}, "payload": payload})
    return orjson.dumps(payload)


def key(row_id: int, *, envelope: bool = False) -> bytes:
    struct = {"id": row_id}
    return orjson.dumps({"schema": {"type": "struct"}, "payload": struct} if envelope else struct)


def test_the_default_mapping_is_todays_contract_byte_for_byte():
    raw = b'{"id": "a", "text": "t", "metadata": {"k": 1}}'
    assert Mapping().native and parse_mapping() == Mapping()
    assert decode_record(raw, None, (), Mapping()).event == decode_input(raw)
    with pytest.raises(InvalidEvent) as caught:
        decode_record(b'{"doc_id": "a", "body": "t"}', None, (), Mapping())
    assert caught.value.kind == "missing_id"


def test_a_flat_topic_with_other_names_is_read_by_settings():
    mapping = parse_mapping(id_from="doc_id", text_from="title,body", metadata_from="lang,author.*")
    raw = orjson.dumps({"doc_id": "kb-17", "title": "Reset a password", "body": "Open settings.", "lang": "en",
                        "author": {"name": "ann", "team": "docs"}, "ignored": [1, 2]})
    event = decode_record(raw, b"kb-17", (), mapping).event
    assert (event.id, event.text) == ("kb-17", "Reset a password\n\nOpen settings.")
    assert event.metadata == {"lang": "en", "name": "ann", "team": "docs"}


def test_a_template_with_a_missing_field_and_an_event_with_no_text():
    mapping = parse_mapping(text_from="{title}: {subtitle}\\n{body}")
    assert decode_record(b'{"id": 1, "title": "T", "body": "B"}', None, (), mapping).event.text == "T: \nB"
    with pytest.raises(InvalidEvent) as caught:
        decode_record(b'{"id": 1, "other": "x"}', None, (), mapping)
    assert caught.value.kind == "missing_text" and "'title'" in caught.value.message


def test_ids_from_the_key_a_json_key_and_numbers():
    assert decode_record(b'{"text": "t"}', b"doc-9", (), parse_mapping(id_from="key")).event.id == "doc-9"
    assert decode_record(b'{"text": "t"}', b'{"id": 42}', (), parse_mapping(id_from="key.id")).event.id == "42"
    assert decode_record(b'{"n": 7, "text": "t"}', None, (), parse_mapping(id_from="n")).event.id == "7"
    for raw, kind in ((b'{"n": true, "text": "t"}', "invalid_id"), (b'{"text": "t"}', "missing_id")):
        with pytest.raises(InvalidEvent) as caught:
            decode_record(raw, None, (), parse_mapping(id_from="n"))
        assert caught.value.kind == kind


def test_a_version_from_a_field_or_a_header():
    mapping = parse_mapping(version_from="header:x-version|updated")
    assert decode_record(b'{"id": "a", "text": "t", "updated": 5}', None, (), mapping).version == 5
    assert decode_record(b'{"id": "a", "text": "t", "updated": 5}', None, (("x-version", b"9"),), mapping).version == 9
    with pytest.raises(InvalidEvent) as caught:
        decode_record(b'{"id": "a", "text": "t", "updated": -1}', None, (), mapping)
    assert caught.value.kind == "invalid_version"


@pytest.mark.parametrize("envelope", [False, True])
def test_debezium_change_events_in_both_envelopes(envelope):
    row = {"id": 42, "title": "Pricing", "body": "Plans and prices.", "lang": "en"}
    created = decode_record(change("c", None, row, 100, envelope=envelope), key(42, envelope=envelope), (), DEBEZIUM)
    assert (created.event.id, created.event.op, created.version) == ("42", "upsert", 100)
    assert created.event.text == "Pricing\n\nPlans and prices." and created.event.metadata == {"lang": "en"}
    snapshot = decode_record(change("r", None, row, 50, envelope=envelope), key(42, envelope=envelope), (), DEBEZIUM)
    assert snapshot.event.op == "upsert"
    updated = decode_record(change("u", row, {**row, "body": "New plans."}, 120, envelope=envelope), key(42), (), DEBEZIUM)
    assert updated.event.text.endswith("New plans.") and updated.version == 120
    deleted = decode_record(change("d", row, None, 130, envelope=envelope), key(42, envelope=envelope), (), DEBEZIUM)
    assert (deleted.event.id, deleted.event.op, deleted.version) == ("42", "delete", 130)
    tombstone = decode_record(None, key(42, envelope=envelope), (), DEBEZIUM)
    assert (tombstone.event.id, tombstone.event.op) == ("42", "delete")
    with pytest.raises(InvalidEvent) as caught:
        decode_record(change("t", None, None, 140, envelope=envelope), None, (), DEBEZIUM)
    assert caught.value.kind == "unsupported_op"


def test_bad_mapping_settings_are_one_line_naming_them():
    for env, setting in (({"EMBEDWORKER_ID_FROM": "after..id"}, "EMBEDWORKER_ID_FROM"),
                         ({"EMBEDWORKER_METADATA_FROM": "a.*.b"}, "EMBEDWORKER_METADATA_FROM"),
                         ({"EMBEDWORKER_INPUT_FORMAT": "avro"}, "EMBEDWORKER_INPUT_FORMAT")):
        with pytest.raises(ConfigError) as caught:
            load_settings({}, environ=env)
        assert setting in str(caught.value) and "\n" not in str(caught.value)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.sampled_from(["id", "text", "after", "before", "op",
                                                                                        "title", "body", "k", "source", "lsn"]),
                                                                       children, max_size=5),
    max_leaves=20,
)
mappings = st.builds(
    parse_mapping,
    input_format=st.sampled_from(["json", "debezium"]),
    id_from=st.sampled_from(["", "id", "key", "key.id", "after.id", "k"]),
    text_from=st.sampled_from(["", "text", "title,body", "{title}\\n{body}", "after.text"]),
    metadata_from=st.sampled_from(["", "metadata", "k,lang", "after.*"]),
    version_from=st.sampled_from(["", "lsn", "source.lsn|header:v", "header:v"]),
)


@hypothesis_settings(max_examples=300, deadline=None)
@given(value=json_values, raw_key=st.none() | st.binary(max_size=12) | json_values.map(orjson.dumps), mapping=mappings)
def test_any_json_under_any_mapping_is_an_event_or_a_dead_letter(value, raw_key, mapping):
    try:
        decoded = decode_record(orjson.dumps(value), raw_key, (("v", b"7"),), mapping)
    except InvalidEvent:
        return
    assert decoded.event.id and (decoded.event.op == "delete" or decoded.event.text.strip())


async def test_a_debezium_table_ends_in_the_store_as_the_table_does():
    broker = MemoryBroker()
    conf = memory_settings(broker, input_format="debezium", text_from="{title}\\n\\n{body}", metadata_from="lang")
    sink = QdrantSink(collection=conf.collection)
    table: dict[int, dict[str, Any] | None] = {}
    records: list[tuple[bytes, bytes | None]] = []
    lsn = 0
    for row_id in range(8):  # the snapshot, then changes
        lsn += 1
        table[row_id] = {"id": row_id, "title": f"Article {row_id}", "body": f"Body {row_id} v0", "lang": "en"}
        records.append((key(row_id), change("r", None, table[row_id], lsn)))
    for step, row_id in enumerate([1, 2, 1, 3, 5, 1, 6]):
        lsn += 1
        before = table[row_id]
        if step in (1, 4):
            table[row_id] = None
            records.append((key(row_id), change("d", before, None, lsn)))
            records.append((key(row_id), None))  # the tombstone after a delete
        else:
            table[row_id] = {**before, "body": f"Body {row_id} v{step + 1}"}
            records.append((key(row_id), change("u", before, table[row_id], lsn, envelope=step % 2 == 0)))
    records.append((key(99), change("t", None, None, lsn + 1)))  # truncate: a dead letter, never a wipe
    async with worker_on(broker, conf, sink=sink) as worker:
        for k, v in records:
            broker.append(conf.input_topic, v, key=k, partition=0)
        tp = TopicPartition(conf.input_topic, 0)
        await until(lambda: broker.committed(conf.group_id, tp) == len(records), "every change committed")
        assert worker.stats.dead_letters == 1
    stored = {p.payload["id"]: p.payload for p in await sink.points(with_vectors=False)}
    expected = {str(i): row for i, row in table.items() if row is not None}
    assert sorted(stored) == sorted(expected)
    for row_id, row in expected.items():
        assert stored[row_id]["text"] == f"{row['title']}\n\n{row['body']}"
        assert stored[row_id]["metadata"] == {"lang": "en"} and stored[row_id]["version_source"] == "user"
    (letter,) = [orjson.loads(r.value) for r in broker.records(conf.dlq_topic)]
    assert letter["error"]["type"] == "unsupported_op"
    await sink.close()
