"""Change the model (or vector size, or quantization) behind an alias without downtime.

`embedworker migrate start|backfill|check|cutover|rollback|finish|status`, one step per call,
each safe to re-run and to interrupt. Readers query the alias (`EMBEDWORKER_COLLECTION`); the
old collection serves them until `cutover` flips the alias to the new one in one step.

The shape, and why:
- **The record lives in the store** (`StoreAdmin.write_record`, key `migration:<alias>`), beside
  the alias it will flip: every worker that writes the store can read it, on a Qdrant server and
  on an embedded path alike, with no other service (Redis is optional, and a Kafka topic would
  not be where the alias is).
- **Dual writes are a second consumer group** (`<group>.migrate.<n>`) that each worker process
  runs beside its own while the record says so (`MigrationFollower`): the shadow has its own
  offsets and its own lag, so a slow or failing new model only lets the shadow fall behind; the
  live collection never waits for it. Its result events and dead letters go to
  `<topic>.shadow` topics, so consumers of the live results see each event once.
- **Backfill before the shadow consumes.** `start` commits, for the shadow group, the live
  group's committed offsets: everything before them is in the live collection (offsets are
  committed only after the write), everything after is replayed by the shadow. `backfill`
  copies the live collection (versions kept, the new model's chunking) and only then moves the
  phase to `dual`, when the shadow begins. In this order a delete the shadow applies can never be
  undone by an older copy, and the version guard keeps a replayed older event from overwriting
  a newer copy. `start --backfill-from topic` instead starts the shadow at the log start (the
  topic must still hold every document).
- **Workers are pinned**: a worker writes the collection of its own model (`Side.matches`),
  resolved once at start, never through the alias, so a flip never sends old-model vectors into
  the new collection. After `finish` a worker whose model is no longer served stops with one line.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from processors.errors import SinkConfigError
from processors.sink import VectorStore, versioned_collection
from schemas import tenant_key
from streams.commands.common import DEFAULT_TIMEOUT_SECONDS, UserError, _open_sink
from streams.config import Settings

log = logging.getLogger(__name__)

PHASES = ("backfill", "dual", "cutover", "rolled_back", "finished")
"""`backfill`: the shadow exists, is being filled, and does not consume yet; `dual`: both groups
write; `cutover`: the alias names the new collection (both still written); `rolled_back`: the
alias names the old one again (both still written); `finished`: one side is served, dual writes
stopped."""
SHADOW_PHASES = ("dual", "cutover", "rolled_back")
BACKFILL_SOURCES = ("collection", "topic")
RECORD_PREFIX = "migration:"
PROGRESS_SECONDS = 2.0
"""How often a backfill records how far it got (`migrate status`)."""
MAX_NAME = 512


def record_key(alias: str) -> str:
    return RECORD_PREFIX + alias


def _text(value: Any, what: str, *, empty: bool = False) -> str:
    if not isinstance(value, str) or len(value) > MAX_NAME or (not value and not empty):
        raise SinkConfigError(f"the migration record's {what} is not a string of at most {MAX_NAME} characters")
    return value


def _count(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise SinkConfigError(f"the migration record's {what} is not a count")
    return value


@dataclass(frozen=True)
class Side:
    """One side of a migration: a collection and the model settings that write it."""

    collection: str
    model: str
    dimensions: int = 0
    embedder: str = "local"
    embeddings_url: str = ""
    quantization: str = "none"

    def matches(self, settings: Settings) -> bool:
        """Whether a worker with these settings embeds as this side does."""
        return (settings.model, settings.dimensions, settings.embedder, settings.quantization) == \
            (self.model, self.dimensions, self.embedder, self.quantization)

    def settings(self, settings: Settings) -> Settings:
        """`settings` with this side's model and collection (its own vector size and quantization)."""
        return settings.replace(
            collection=self.collection, model=self.model, dimensions=self.dimensions, embedder=self.embedder,
            embeddings_url=self.embeddings_url or settings.embeddings_url, quantization=self.quantization,
            versioned_collections=False,
        )

    @classmethod
    def of(cls, settings: Settings, collection: str) -> "Side":
        return cls(collection, settings.model, settings.dimensions, settings.embedder,
                   settings.embeddings_url if settings.embedder == "http" else "", settings.quantization)

    @classmethod
    def parse(cls, value: Any, what: str) -> "Side":
        if not isinstance(value, dict):
            raise SinkConfigError(f"the migration record's {what} side is not an object")
        quantization = _text(value.get("quantization", "none"), f"{what}.quantization")
        embedder = _text(value.get("embedder", "local"), f"{what}.embedder")
        if quantization not in ("none", "int8", "binary") or embedder not in ("local", "http"):
            raise SinkConfigError(f"the migration record's {what} side names an unknown embedder or quantization")
        return cls(
            collection=_text(value.get("collection"), f"{what}.collection"),
            model=_text(value.get("model"), f"{what}.model"),
            dimensions=_count(value.get("dimensions", 0), f"{what}.dimensions"),
            embedder=embedder,
            embeddings_url=_text(value.get("embeddings_url", ""), f"{what}.embeddings_url", empty=True),
            quantization=quantization,
        )

    def describe(self) -> str:
        size = f", {self.dimensions} dims" if self.dimensions else ""
        return f"{self.collection} ({self.model}{size})"


@dataclass
class Migration:
    """The record of one migration of `alias` (see the module's notes)."""

    alias: str
    phase: str
    old: Side
    new: Side
    shadow_group: str
    backfill_from: str = "collection"
    started_at: float = 0.0
    updated_at: float = 0.0
    backfill: dict[str, Any] = field(default_factory=dict)
    last_check: dict[str, Any] | None = None
    outcome: str = ""
    """After `finish`: `new` (finished after a cutover) or `old` (after a rollback)."""

    @property
    def served(self) -> Side:
        """The side the alias names in this phase."""
        return self.new if self.phase == "cutover" or (self.phase == "finished" and self.outcome == "new") else self.old

    def side_of(self, settings: Settings) -> str | None:
        """`old`, `new` or None: which side a worker with these settings writes."""
        if self.old.matches(settings):
            return "old"
        if self.new.matches(settings):
            return "new"
        return None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def parse(cls, value: Any) -> "Migration":
        """A record read back from the store (untrusted: every field checked)."""
        if not isinstance(value, dict):
            raise SinkConfigError("the migration record is not an object")
        phase = value.get("phase")
        if phase not in PHASES:
            raise SinkConfigError(f"the migration record's phase is not one of {', '.join(PHASES)}")
        source = value.get("backfill_from", "collection")
        if source not in BACKFILL_SOURCES:
            raise SinkConfigError("the migration record's backfill source is unknown")
        backfill, check = value.get("backfill") or {}, value.get("last_check")
        if not isinstance(backfill, dict) or not (check is None or isinstance(check, dict)):
            raise SinkConfigError("the migration record's backfill or check is not an object")
        outcome = value.get("outcome", "")
        if outcome not in ("", "new", "old"):
            raise SinkConfigError("the migration record's outcome is unknown")
        times = [value.get("started_at", 0.0), value.get("updated_at", 0.0)]
        if not all(isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) for t in times):
            raise SinkConfigError("the migration record's times are not numbers")
        return cls(
            alias=_text(value.get("alias"), "alias"), phase=phase, old=Side.parse(value.get("old"), "old"),
            new=Side.parse(value.get("new"), "new"), shadow_group=_text(value.get("shadow_group"), "shadow group"),
            backfill_from=source, started_at=float(times[0]), updated_at=float(times[1]), backfill=backfill, last_check=check,
            outcome=outcome,
        )


async def read_migration(store: Any, alias: str) -> Migration | None:
    value = await store.read_record(record_key(alias))
    return None if value is None else Migration.parse(value)


async def save(store: Any, migration: Migration) -> None:
    migration.updated_at = time.time()
    await store.write_record(record_key(migration.alias), migration.to_json())


def model_slug(model: str, dimensions: int = 0) -> str:
    name = Path(model.rstrip("/\\")).name or model
    return f"{name}-{dimensions}d" if dimensions else name


def side_view(store: Any, side: Side) -> Any:
    """The store on a side's own collection, created (if missing) as that side asks: its quantization, no alias over it."""
    view = store.for_collection(side.collection)
    view.quantization = side.quantization
    view.versioned_collections = False
    return view


# ---- the steps ------------------------------------------------------------------------------


class _Store:
    """The store a step works on: given (in-process, tests) or opened here and closed after."""

    def __init__(self, settings: Settings, store: Any) -> None:
        self.settings, self.given, self.store = settings, store, store

    async def __aenter__(self) -> Any:
        if self.store is None:
            self.store = _open_sink(self.settings)
        return self.store

    async def __aexit__(self, *exc: Any) -> None:
        if self.given is None and self.store is not None:
            await self.store.close()


async def _current(store: Any, alias: str, *, phases: Sequence[str] | None = None) -> Migration:
    try:
        migration = await read_migration(store, alias)
    except SinkConfigError as exc:
        raise UserError(str(exc)) from None
    if migration is None or (migration.phase == "finished" and phases is not None and "finished" not in phases):
        raise UserError(f"no migration of {alias!r} in progress (embedworker migrate start)")
    if phases is not None and migration.phase not in phases:
        raise UserError(f"the migration of {alias!r} is in phase {migration.phase}; this step needs {' or '.join(phases)}")
    return migration


async def start(
    settings: Settings,
    *,
    model: str,
    dimensions: int = 0,
    embedder: str | None = None,
    embeddings_url: str = "",
    quantization: str | None = None,
    backfill_from: str = "collection",
    store: VectorStore | None = None,
    timeout: float = DEFAULT_TIMEOUT_SECONDS,
) -> Migration:
    """Create the shadow collection, fix where the shadow group starts, record the migration."""
    from streams.assembly import build_embedder, close_all

    if backfill_from not in BACKFILL_SOURCES:
        raise UserError(f"--backfill-from must be one of {', '.join(BACKFILL_SOURCES)}")
    alias = settings.collection
    async with _Store(settings, store) as store:
        migration = await read_migration(store, alias)
        wanted = Side(alias, model, dimensions, embedder or settings.embedder,
                      embeddings_url if (embedder or settings.embedder) == "http" else "", quantization or settings.quantization)
        if migration is not None and migration.phase != "finished":
            if (migration.new.model, migration.new.dimensions, migration.new.embedder) != (wanted.model, wanted.dimensions, wanted.embedder):
                raise UserError(f"a migration of {alias!r} to {migration.new.describe()} is in progress (phase {migration.phase}); "
                                "finish or roll it back first")
            if migration.phase != "backfill":
                return migration  # started before: nothing left to do here
        else:
            live = await store.alias_target(alias)
            if live is None:
                if not await store.collection_exists(alias):
                    raise UserError(f"collection {alias!r} does not exist in {store.location}: run the worker first")
                # An alias over a collection of its own name would hide that collection's writers (Qdrant refuses it;
                # on qdrant-edge the pinned old side would resolve to the new collection after the flip).
                raise UserError(
                    f"{alias!r} is a plain collection, not an alias: re-embed it once into a versioned collection behind "
                    f"an alias (embedworker reembed --from-collection {alias} --target-collection NEW, then point an alias "
                    "at it; new collections get one with EMBEDWORKER_VERSIONED_COLLECTIONS=1)"
                )
            old = Side.of(settings, live)
            if wanted.model == old.model and wanted.dimensions == old.dimensions and wanted.embedder == old.embedder \
                    and wanted.quantization == old.quantization:
                raise UserError(f"{alias!r} is already written by {old.describe()}: nothing to migrate to")
            n = 1
            while True:
                name = versioned_collection(alias, model_slug(model, dimensions), n)
                if name != live and not await store.collection_exists(name):
                    break
                n += 1
            migration = Migration(
                alias=alias, phase="backfill", old=old, new=Side(name, *[getattr(wanted, f) for f in ("model", "dimensions", "embedder", "embeddings_url", "quantization")]),
                shadow_group=f"{settings.group_id}.migrate.{n}", backfill_from=backfill_from, started_at=time.time(),
            )
            await save(store, migration)  # first: a start interrupted below is finished by running it again
        new_settings = migration.new.settings(settings)
        model_ = await asyncio.get_running_loop().run_in_executor(None, build_embedder, new_settings)
        try:
            target = side_view(store, migration.new)
            try:
                await target.ensure_collection(model_.dim, model=model_.name, model_version=model_.version)
            except SinkConfigError as exc:
                raise UserError(str(exc)) from None
        finally:
            await close_all([model_])
        await _start_shadow_group(settings, migration, timeout)
        if migration.backfill_from == "topic":
            migration.phase = "dual"
            migration.backfill = {"source": "topic", "done": True}
        await save(store, migration)
        return migration


async def _start_shadow_group(settings: Settings, migration: Migration, timeout: float) -> None:
    """Commit, for each partition the shadow group has no offset of, where it begins: the live group's offset
    (or the log start, with --backfill-from topic or where the live group never committed)."""
    from aiokafka import TopicPartition

    from streams.backends.kafka import make_consumer
    from streams.commands.common import _start_client, _stop_quietly
    from streams.commands.status import partition_offsets

    from streams.backends.kafka import ensure_topics

    live = {p.partition: p for p in await partition_offsets(settings, timeout=timeout)}
    # Where the shadow's result events and dead letters go (a broker may not create topics on first use).
    await ensure_topics(settings, {f"{settings.output_topic}.shadow": max(1, len(live)), f"{settings.dlq_topic}.shadow": 1})
    shadow = {p.partition: p for p in await partition_offsets(settings.replace(group_id=migration.shadow_group), timeout=timeout)}
    offsets = {}
    for partition, row in live.items():
        if shadow.get(partition) is not None and shadow[partition].committed is not None:
            continue  # an interrupted start committed it already; never move a started shadow
        begin = row.log_start if migration.backfill_from == "topic" or row.committed is None else row.committed
        offsets[TopicPartition(settings.input_topic, partition)] = begin
    if not offsets:
        return
    client = make_consumer(settings, group_id=migration.shadow_group, enable_auto_commit=False, client_id="embedworker-migrate")
    await _start_client(client, settings, timeout)
    try:
        client.assign(list(offsets))
        await asyncio.wait_for(client.commit(offsets), timeout)
    finally:
        await _stop_quietly(client)
    log.info("shadow group %s starts at %s", migration.shadow_group, {tp.partition: o for tp, o in offsets.items()})


async def backfill(
    settings: Settings, *, store: VectorStore | None = None, batch_size: int = 256, embedder: Any = None,
) -> tuple[Migration, Any]:
    """Copy the live collection into the shadow with the new model (versions kept), then begin dual writes."""
    from streams.assembly import build_embedder, close_all

    async with _Store(settings, store) as store:
        migration = await _current(store, settings.collection)
        if migration.phase != "backfill":
            return migration, None  # done before (or --backfill-from topic)
        owned = None
        if embedder is None:  # loaded before the clock starts: the rate is the copy's
            embedder = owned = await asyncio.get_running_loop().run_in_executor(None, build_embedder, migration.new.settings(settings))
        try:
            return await _backfill(settings, store, migration, embedder, batch_size)
        finally:
            await close_all([owned])


async def _backfill(settings: Settings, store: Any, migration: Migration, embedder: Any, batch_size: int) -> tuple[Migration, Any]:
    from streams.commands.reembed import reembed

    began = time.monotonic()
    saved = [0.0]

    async def progress(report: Any, total: int | None) -> None:
        if time.monotonic() - saved[0] >= PROGRESS_SECONDS:
            saved[0] = time.monotonic()
            migration.backfill = {"source": "collection", "done": False, "embedded": report.embedded, "total": total}
            await save(store, migration)

    report = await reembed(
        migration.new.settings(settings), model=migration.new.model, target=migration.new.collection,
        from_collection=migration.old.collection, batch_size=batch_size, embedder=embedder, store=store,
        on_progress=progress,
    )
    seconds = time.monotonic() - began
    migration.backfill = {
        "source": "collection", "done": True, "read": report.read, "embedded": report.embedded, "failed": report.failed,
        "inconsistent": report.inconsistent, "seconds": round(seconds, 3),
        "documents_per_second": round(report.embedded / seconds, 1) if seconds > 0 else None,
    }
    if report.failed:
        raise UserError(f"{report.failed} documents could not be embedded with {migration.new.model}; run backfill again")
    migration.phase = "dual"
    await save(store, migration)
    return migration, report


@dataclass
class CheckReport:
    live_documents: int
    shadow_documents: int
    missing: int
    missing_ids: list[str]
    extra: int
    shadow_lag: int | None
    queries: int
    recall_at_10: float | None
    overlap_at_10: float | None
    passed: bool
    reasons: list[str]


MAX_REPORTED_IDS = 20


async def _documents(sink: Any) -> dict[str, dict[str, Any]]:
    """Chunk 0 of each document (its id, text when stored, chunk count)."""
    found: dict[str, dict[str, Any]] = {}
    for point in await sink.points(with_vectors=False):
        payload = point.payload
        if int(payload.get("chunk_index", 0) or 0) == 0 and isinstance(payload.get("id"), str):
            tenant = payload.get("tenant")
            found[payload["id"] if not isinstance(tenant, str) else tenant_key(tenant, payload["id"])] = payload
    return found


def load_queries(path: str) -> list[dict[str, Any]]:
    """A labelled query file in the recall benchmark's format: JSON lines of {"query": text, "relevant": [ids]}
    (`bench/data/recall_queries.jsonl`; `ids` is taken as well)."""
    import orjson

    queries = []
    try:
        with open(path, "rb") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                row = orjson.loads(line)
                ids = row.get("relevant", row.get("ids")) if isinstance(row, dict) else None
                if not (isinstance(row.get("query"), str) and isinstance(ids, list) and all(isinstance(i, str) for i in ids)):
                    raise UserError(f"{path}:{number}: expected {{\"query\": text, \"relevant\": [ids]}}")
                queries.append({"query": row["query"], "ids": ids})
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror}") from None
    except orjson.JSONDecodeError:
        raise UserError(f"{path}: not JSON lines") from None
    return queries


async def check(
    settings: Settings,
    *,
    store: VectorStore | None = None,
    queries_file: str | None = None,
    sample: int = 50,
    min_recall: float = 0.8,
    min_overlap: float = 0.0,
    timeout: float = DEFAULT_TIMEOUT_SECONDS,
    embedders: tuple[Any, Any] | None = None,
) -> CheckReport:
    """The quality gate: every live document is in the shadow (within the shadow's lag), and queries find
    in the shadow what they should (recall@10) and what the live collection finds (top-10 overlap)."""
    from streams.assembly import build_embedder, close_all
    from streams.commands.status import partition_offsets

    async with _Store(settings, store) as store:
        migration = await _current(store, settings.collection, phases=SHADOW_PHASES)
        live_sink, shadow_sink = store.for_collection(migration.old.collection), store.for_collection(migration.new.collection)
        live, shadow = await _documents(live_sink), await _documents(shadow_sink)
        missing = sorted(set(live) - set(shadow))
        lag = None
        try:
            rows = await partition_offsets(settings.replace(group_id=migration.shadow_group), timeout=timeout)
            lag = sum(r.lag for r in rows)
        except UserError as exc:
            log.warning("shadow lag unknown: %s", exc)
        if queries_file:
            queries = load_queries(queries_file)
        else:  # canaries: stored texts should find their own document
            texts = [(i, p["text"]) for i, p in sorted(live.items()) if isinstance(p.get("text"), str) and p.get("text")]
            step = max(1, len(texts) // max(1, sample))
            queries = [{"query": text[:2000], "ids": [doc_id]} for doc_id, text in texts[::step][:sample]]
        loop = asyncio.get_running_loop()
        owned: list[Any] = []
        if embedders is None:
            old_model = await loop.run_in_executor(None, build_embedder, migration.old.settings(settings))
            new_model = await loop.run_in_executor(None, build_embedder, migration.new.settings(settings))
            owned = [old_model, new_model]
        else:
            old_model, new_model = embedders
        recalls, overlaps = [], []
        try:
            texts = [q["query"] for q in queries]
            new_vectors = (await loop.run_in_executor(None, new_model.embed, texts)).vectors if texts else []
            old_vectors = (await loop.run_in_executor(None, old_model.embed, texts)).vectors if texts else []
            for query, new_vector, old_vector in zip(queries, new_vectors, old_vectors):
                shadow_ids = _doc_ids(await shadow_sink.search(new_vector, limit=30))
                live_ids = _doc_ids(await live_sink.search(old_vector, limit=30))
                relevant = set(query["ids"])
                if relevant:
                    recalls.append(len(relevant & set(shadow_ids)) / len(relevant))
                if live_ids:
                    overlaps.append(len(set(live_ids) & set(shadow_ids)) / len(live_ids))
        finally:
            await close_all(owned)
        recall = round(sum(recalls) / len(recalls), 4) if recalls else None
        overlap = round(sum(overlaps) / len(overlaps), 4) if overlaps else None
        reasons = []
        if len(missing) > (lag or 0):
            reasons.append(f"{len(missing)} live documents are not in the shadow (its lag: {lag} messages)")
        if recall is not None and recall < min_recall:
            reasons.append(f"recall@10 {recall} is below {min_recall}")
        if overlap is not None and overlap < min_overlap:
            reasons.append(f"top-10 overlap {overlap} is below {min_overlap}")
        if not queries:
            reasons.append("no queries: the live collection stores no text (EMBEDWORKER_STORE_TEXT) and no --queries file was given")
        report = CheckReport(
            live_documents=len(live), shadow_documents=len(shadow), missing=len(missing), missing_ids=missing[:MAX_REPORTED_IDS],
            extra=len(set(shadow) - set(live)), shadow_lag=lag, queries=len(queries), recall_at_10=recall,
            overlap_at_10=overlap, passed=not reasons, reasons=reasons,
        )
        migration.last_check = {"at": time.time(), "passed": report.passed, "recall_at_10": recall, "overlap_at_10": overlap,
                                "missing": report.missing, "live_documents": report.live_documents,
                                "shadow_documents": report.shadow_documents, "reasons": reasons}
        await save(store, migration)
        return report


def _doc_ids(hits: Sequence[Any]) -> list[str]:
    """The first 10 distinct documents among chunk hits."""
    ids: list[str] = []
    for hit in hits:
        doc_id, tenant = hit.payload.get("id", hit.id), hit.payload.get("tenant")
        if isinstance(tenant, str):
            doc_id = tenant_key(tenant, doc_id)  # as `_documents` names it
        if doc_id not in ids:
            ids.append(doc_id)
        if len(ids) == 10:
            break
    return ids


async def _flip(store: Any, migration: Migration, side: Side, phase: str) -> Migration:
    """The alias to `side`, then the record to `phase`: a run again after a crash in between finds the alias and saves."""
    if await store.alias_target(migration.alias) != side.collection:
        await store.switch_alias(migration.alias, side.collection)
    if migration.phase != phase:
        migration.phase = phase
        await save(store, migration)
    return migration


async def cutover(settings: Settings, *, store: VectorStore | None = None, force: bool = False) -> Migration:
    """Flip the alias to the new collection (one step), only after a passing check unless `force`."""
    async with _Store(settings, store) as store:
        migration = await _current(store, settings.collection, phases=("dual", "rolled_back", "cutover"))
        if migration.phase != "cutover" and not force and not (migration.last_check or {}).get("passed"):
            raise UserError("the last check did not pass (embedworker migrate check), or none ran: cutover refused (--force)")
        return await _flip(store, migration, migration.new, "cutover")


async def rollback(settings: Settings, *, store: VectorStore | None = None) -> Migration:
    """Flip the alias back to the old collection (kept current by the live group until `finish`)."""
    async with _Store(settings, store) as store:
        migration = await _current(store, settings.collection, phases=("cutover", "rolled_back"))
        return await _flip(store, migration, migration.old, "rolled_back")


async def finish(settings: Settings, *, store: VectorStore | None = None, drop_old: bool = False) -> Migration:
    """Stop dual writes; the served side stays. `drop_old` deletes the collection the alias no longer names."""
    async with _Store(settings, store) as store:
        migration = await _current(store, settings.collection, phases=("dual", "cutover", "rolled_back", "finished"))
        target = await store.alias_target(migration.alias)
        if migration.phase == "dual" and target != migration.new.collection:  # (dual with the new one served: a killed cutover)
            raise UserError(f"the migration of {migration.alias!r} is in phase dual: cut over (or roll back) before finish")
        if migration.phase != "finished":
            # What the alias names decides, not the phase: a flip interrupted before its record was saved still counts.
            if target not in (migration.new.collection, migration.old.collection):
                raise UserError(f"the alias {migration.alias!r} names {target!r}, neither side of the migration: nothing finished")
            migration.outcome = "new" if target == migration.new.collection else "old"
            migration.phase = "finished"
            await save(store, migration)
        served = migration.served
        unused = migration.old if served is migration.new else migration.new
        if drop_old and unused.collection != served.collection and await store.collection_exists(unused.collection):
            if target != served.collection:
                raise UserError(f"the alias {migration.alias!r} does not name {served.collection!r}: nothing dropped")
            if not unused.collection.startswith(f"{migration.alias}__"):
                raise UserError(f"{unused.collection!r} is not a versioned collection of {migration.alias!r}: not dropped")
            await store.drop_collection(unused.collection)
        return migration


async def status(settings: Settings, *, store: VectorStore | None = None, timeout: float = DEFAULT_TIMEOUT_SECONDS) -> dict[str, Any]:
    """The phase, both collections and their point counts, the shadow's lag, the last check."""
    from streams.commands.status import partition_offsets

    async with _Store(settings, store) as store:
        migration = await _current(store, settings.collection, phases=PHASES)
        report: dict[str, Any] = {"alias": migration.alias, "phase": migration.phase, "serves": await store.alias_target(migration.alias)}
        for name, side in (("old", migration.old), ("new", migration.new)):
            exists = await store.collection_exists(side.collection)
            report[name] = {**asdict(side), "points": await store.for_collection(side.collection).count() if exists else None}
        report["shadow_group"] = migration.shadow_group
        try:
            rows = await partition_offsets(settings.replace(group_id=migration.shadow_group), timeout=timeout)
            report["shadow_lag"] = sum(r.lag for r in rows)
        except UserError as exc:
            report["shadow_lag"] = None
            report["shadow_lag_error"] = str(exc)
        report["backfill"] = migration.backfill
        report["last_check"] = migration.last_check
        return report


# ---- the worker's side ---------------------------------------------------------------------


async def pinned_sink(settings: Settings, sink: Any) -> Any:
    """The collection a worker writes: its own side's during a migration, else what the alias names now.

    Resolved once, at start: a later flip of the alias must never redirect a running worker."""
    if getattr(sink, "routes_tenants", False) or (settings.tenant_from and settings.tenancy == "collection"):
        return sink  # a collection per tenant: no alias to pin
    try:
        migration = await read_migration(sink, settings.collection)
    except AttributeError:
        return sink  # a store without control records (a test double): as given
    except SinkConfigError:
        raise
    except Exception as exc:  # e.g. a key limited to one collection may not read the control collection
        log.warning("cannot read the migration record of %s (%s): writing %s as configured, migrations not followed",
                    settings.collection, type(exc).__name__, settings.collection)
        return sink
    if migration is not None and migration.phase != "finished":
        side = migration.side_of(settings)
        if side is None:
            raise SinkConfigError(
                f"a migration of {settings.collection!r} from {migration.old.describe()} to {migration.new.describe()} "
                f"is in progress; this worker's model {settings.model!r} is neither side"
            )
        return sink.for_collection(getattr(migration, side).collection)
    target = await sink.alias_target(settings.collection)
    view = sink.for_collection(target or settings.collection)
    view.pin_alias = True  # an alias the worker creates itself is resolved once it exists (`ensure_collection`)
    return view


class MigrationFollower:
    """Runs the shadow consumer group in this process while the migration record asks for it.

    Every `poll_seconds` it reads the record: in a dual-write phase a worker of the old side also
    runs a `Worker` of the new side (group `shadow_group`, the new model, the new collection,
    results and dead letters to `<topic>.shadow`); otherwise it stops it. A failing shadow is one
    warning and a metric, and is started again with a growing delay: the live worker never waits.
    After `finish`, a worker whose collection is no longer served is stopped (`failure` says why).
    """

    def __init__(self, settings: Settings, parts: Any, *, poll_seconds: float = 5.0, main: Any = None) -> None:
        self.settings, self.parts, self.poll_seconds, self.main = settings, parts, poll_seconds, main
        self.metrics = parts.metrics
        self.failure: str | None = None
        self.shadow: Any = None
        self._shadow_task: asyncio.Task[None] | None = None
        self._stopping = False
        self._failures = 0
        self._retry_at = 0.0
        self._counted = 0
        self._record_unreadable = False

    def request_stop(self) -> None:
        self._stopping = True
        if self.shadow is not None:
            self.shadow.request_stop()

    async def run(self) -> None:
        try:
            while not self._stopping:
                await self.poll()
                await asyncio.sleep(self.poll_seconds)
        finally:
            await self._stop_shadow()

    async def poll(self) -> None:
        from streams.metrics import MIGRATION_PHASES

        if self.settings.tenant_from and self.settings.tenancy == "collection":
            return  # migrations move one collection; a collection per tenant is not one
        try:
            migration = await read_migration(self.parts.sink, self.settings.collection)
        except Exception as exc:
            self.metrics.migration_errors.inc()
            level = logging.DEBUG if self._record_unreadable else logging.WARNING  # a lasting cause is one line
            self._record_unreadable = True
            log.log(level, "cannot read the migration record of %s: %s", self.settings.collection, " ".join(str(exc).split())[:300])
            return
        self._record_unreadable = False
        phase = migration.phase if migration is not None else "none"
        for name in MIGRATION_PHASES:
            self.metrics.migration_phase.labels(phase=name).set(1 if name == phase else 0)
        self._count_shadow()
        if migration is None:
            await self._stop_shadow()
            return
        side = migration.side_of(self.settings)
        if migration.phase == "finished" or side is None:
            await self._stop_shadow()
            served = migration.served
            if side is not None and getattr(migration, side) is not served and self.main is not None and self.failure is None:
                self.failure = (f"the migration of {migration.alias!r} finished and serves {served.describe()}; this worker "
                                f"writes {getattr(migration, side).describe()}: restart it with EMBEDWORKER_MODEL={served.model}"
                                + (f" and EMBEDWORKER_DIMENSIONS={served.dimensions}" if served.dimensions else "")
                                + f" and EMBEDWORKER_QUANTIZATION={served.quantization}")
                log.error("%s", self.failure)
                self.main.request_stop()
            return
        if side == "old" and migration.phase in SHADOW_PHASES:
            if self._shadow_task is None and time.monotonic() >= self._retry_at:
                self._shadow_task = asyncio.create_task(self._run_shadow(migration))
        else:
            await self._stop_shadow()

    def _count_shadow(self) -> None:
        shadow = self.shadow
        if shadow is None:
            self.metrics.migration_shadow_lag.set(0)
            return
        self.metrics.migration_shadow_lag.set(sum(shadow.lag_records().values()))
        processed = shadow.stats.processed
        if processed > self._counted:
            self.metrics.migration_shadow_processed.inc(processed - self._counted)
        self._counted = processed

    async def _run_shadow(self, migration: Migration) -> None:
        from streams.assembly import NO_CACHE, assemble
        from streams.metrics import Metrics

        settings = migration.new.settings(self.settings).replace(
            group_id=migration.shadow_group, output_topic=f"{self.settings.output_topic}.shadow",
            dlq_topic=f"{self.settings.dlq_topic}.shadow", metrics_port=0, processes=1,
        )
        try:
            sink = side_view(self.parts.sink, migration.new)
            async with assemble(settings, sink=sink, cache=self.parts.cache or NO_CACHE, metrics=Metrics()) as parts:
                self.shadow = parts.worker()
                self._counted = 0
                log.info("dual writes: %s -> %s in group %s", settings.input_topic, migration.new.describe(), migration.shadow_group)
                if self._stopping:
                    self.shadow.request_stop()
                await self.shadow.run()
                self._failures = 0
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._failures += 1
            self.metrics.migration_errors.inc()
            delay = min(60.0, 2.0 ** self._failures)
            self._retry_at = time.monotonic() + delay
            log.warning("the shadow worker of %s stopped: %s: %s (again in %.0fs; the live collection goes on)",
                        migration.alias, type(exc).__name__, " ".join(str(exc).split())[:300], delay)
        finally:
            self._count_shadow()
            self.shadow = None
            self._shadow_task = None

    async def _stop_shadow(self) -> None:
        task = self._shadow_task
        if task is None:
            return
        if self.shadow is not None:
            self.shadow.request_stop()
        try:
            await asyncio.wait_for(asyncio.shield(task), self.settings.shutdown_timeout_seconds + 10)
        except asyncio.TimeoutError:
            task.cancel()
        except Exception:
            pass

