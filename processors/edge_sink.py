"""The vector store on Qdrant Edge (`qdrant-edge-py`, import name `qdrant_edge`): Qdrant's Rust
engine embedded in-process, the same interface as `processors.sink.QdrantSink`.

Layout: one edge shard per collection, in the directory `path/<collection>` (not the layout of
qdrant-client's `path=` store, which this sink refuses to open: a directory with `meta.json`). The shard is
created by `ensure_collection(dim)` (cosine distance) or loaded when it exists; a stored
dimension that differs from `dim` is a `SinkConfigError`.

Durability (measured, qdrant-edge-py 0.9.0, see bench/store_compare.py and the tests):
- The shard keeps a write-ahead log (on by default; this sink never turns it off). `update()`
  appends to the mmap'd WAL, so an acknowledged upsert survives SIGKILL of the process without
  `flush()`: the next `load` replays the WAL (about 1.3 s for 20,000 unflushed 384-d points).
- `update()` does not fsync/msync; `flush()` msyncs the WAL and the segments. So against power
  loss or a kernel crash, only what was flushed is safe. The sink flushes at most every
  `flush_interval_seconds` after an upsert (0: after every upsert), and on `close()`; that
  also bounds the WAL replay at the next start.
- Without the WAL (`wal_enabled=False`, not used here) nothing written since the last flush
  survives SIGKILL.
- The WAL is locked: one process (and one open shard) per collection directory; a second
  opener gets a `SinkConfigError`.

Every call runs on one dedicated thread, like `QdrantSink`: the engine works inline and would
otherwise block the event loop, and one thread keeps upserts in submission order (last write wins).
But the 0.9.0 binding holds the GIL while it works: `update()` (~5 ms per 256 points) and `query()`
are short, `flush()` takes ~50-100 ms (so the loop stalls that long once per flush interval; 5 s
by default, like a Qdrant server's flush_interval_sec), and `optimize()` takes seconds (~2.5 s
for 10,000 points, ~8 s for 20,000): never call it on a live worker. Brute-force search needs no index at this
scale (~3 ms p50 at 20,000 points; ~1.5 ms with HNSW).

Sparse vectors (`sparse="bm25"`): a shard created then also holds the sparse vector `bm25`
(`Modifier.Idf`) beside the unnamed dense one; the sink computes each point's vector with
qdrant-edge's own `Bm25` (`processors.sparse`) on its thread, and hybrid search is the
engine's `Fusion.Rrf(k=RRF_K)` over a dense and a sparse prefetch.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

import numpy as np

from processors.threaded import ThreadedStore
from processors.sink import (
    INDEX_KINDS, LEGACY_ID_SAMPLE, MODEL_SAMPLE, PAYLOAD_INDEXES, DocumentWrite, Hit, Point, SinkConfigError, StoredHead,
    StoredPoint, check_id_scheme, check_model, check_sparse_config, engine_vectors, replace_chunks, split_vector, stored_head,
    MAX_RECORD_BYTES, TENANT_FIELD, WriteReport, check_quantization, parse_record, record_text, replaceable, surplus_filter, upsert_condition, versioned_collection,
)
from processors.sparse import RRF_K, SPARSE_OFF, SPARSE_VECTOR, SparseVector, bm25_encoder
from schemas import point_id

log = logging.getLogger(__name__)

_CONFIG_FILE = "edge_config.json"
ALIASES_FILE = "aliases.json"
"""qdrant-edge has no aliases (a shard is a directory): the path's own record, {alias: collection}."""


def read_aliases(path: str) -> dict[str, str]:
    """The alias record of an edge path (empty when there is none)."""
    try:
        with open(os.path.join(path, ALIASES_FILE), encoding="utf-8") as f:
            record = json.load(f)
    except FileNotFoundError:
        return {}
    if not isinstance(record, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in record.items()):
        raise SinkConfigError(f"{os.path.join(path, ALIASES_FILE)} is not an alias record ({{alias: collection}})")
    return record


def write_aliases(path: str, record: dict[str, str]) -> None:
    """Replace the alias record atomically (written aside, synced, renamed over): a crash leaves the old or the new."""
    _replace_file(path, ALIASES_FILE, json.dumps(record, sort_keys=True))


def _replace_file(path: str, name: str, text: str) -> None:
    os.makedirs(path, exist_ok=True)
    temporary = os.path.join(path, name + ".tmp")
    with open(temporary, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, os.path.join(path, name))


CONTROL_FILE = "control.json"
"""The path's control records ({key: JSON text}), replaced atomically like the alias record."""


def read_control(path: str) -> dict[str, str]:
    try:
        with open(os.path.join(path, CONTROL_FILE), encoding="utf-8") as f:
            text = f.read(MAX_RECORD_BYTES * 4 + 1)
    except FileNotFoundError:
        return {}
    try:
        record = json.loads(text)
    except ValueError:
        record = None
    if not isinstance(record, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in record.items()):
        raise SinkConfigError(f"{os.path.join(path, CONTROL_FILE)} is not a control record ({{key: JSON text}})")
    return record


def holds_edge_shards(path: str, collection: str) -> bool:
    """Whether `path` holds qdrant-edge shards for `collection` (directly, or behind an alias)."""
    if os.path.isfile(os.path.join(path, ALIASES_FILE)):
        return True
    return os.path.isfile(os.path.join(path, collection, _CONFIG_FILE))


_REJECTION_MARKERS = ("dimension error", "wrong input", "bad input", "bad request", "validation", "not finite", "contains nan")
"""Phrases of qdrant-edge's errors about the request itself (not the disk, not the shard's state)."""


class _Shared:
    """State shared by a sink and its `for_collection` views: one thread, the open shards."""

    def __init__(self, path: str, flush_interval_seconds: float) -> None:
        self.path = path
        self.flush_interval_seconds = flush_interval_seconds
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qdrant-edge")
        self.shards: dict[str, Any] = {}  # collection -> EdgeShard (touched only on the executor thread)
        self.dims: dict[str, int] = {}
        self.last_flush: dict[str, float] = {}
        self.aliases: dict[str, str] | None = None  # read on first use, on the executor thread
        self.closed = False


class EdgeSink(ThreadedStore):
    """Qdrant Edge, embedded and on disk.

    Keyword-only settings:
    - `collection`: collection name (a shard directory `path/<collection>`, cosine distance).
    - `path`: the directory holding one shard per collection (created if missing).
    - `flush_interval_seconds`: flush (msync) to disk at most this often after upserts; 0 flushes
      after every upsert. Upserts survive SIGKILL either way (WAL); this bounds what a power
      loss can take and how much WAL the next start replays.
    - `sparse`: `off` (default) or `bm25`: a BM25 vector per point beside the dense one; a
      dense-only shard is then a `SinkConfigError`.
    - `quantization`: `none` (default), `int8` or `binary`, for a shard created here.
    - `versioned_collections`: a shard created here is `versioned_collection(collection, model)`,
      named by the alias `collection` in the path's own record (`aliases.json`, replaced
      atomically); an existing shard or alias is used as it is. Default off.
    - `payload_only_writes`: an update of a one-chunk document with unchanged text rewrites only
      its payload (default on; `processors.sink.keeps_vector`).
    - `conditional_writes`: the version guard also inside the engine (off: a shard is one
      process's and every write goes through this sink's one thread, so the read of chunk 0
      before a write is exact; the condition costs ~1.5x per batch: `python -m bench.host_costs`).
    """

    def __init__(
        self, *, collection: str, path: str, flush_interval_seconds: float = 5.0, payload_indexes: dict[str, str] | None = None,
        sparse: str = SPARSE_OFF, conditional_writes: bool = False, payload_only_writes: bool = True,
        quantization: str = "none",
        versioned_collections: bool = False,
    ) -> None:
        import qdrant_edge  # noqa: F401  (fail at construction when the package is missing)

        if not path:
            raise SinkConfigError("EdgeSink needs a path (a directory for its shards)")
        if flush_interval_seconds < 0:
            raise SinkConfigError("flush_interval_seconds must be >= 0")
        _check_name(collection)
        self.collection = collection
        self.location = path
        self.payload_indexes = {**PAYLOAD_INDEXES, **(payload_indexes or {})}
        self.sparse = sparse
        self.conditional_writes = conditional_writes
        self.payload_only_writes = payload_only_writes
        self.quantization = check_quantization(quantization)
        self.versioned_collections = versioned_collections
        self._bm25 = bm25_encoder(sparse)
        self._shared = _Shared(os.path.abspath(path), flush_interval_seconds)

    # ---- plumbing (everything below `_call` runs on the executor thread) -----------------
    # `for_collection` (ThreadedStore): a view shares the thread and the open shards; closing
    # either closes all shards.

    def _executor(self) -> ThreadPoolExecutor:
        return self._shared.executor

    def _check_open(self) -> None:
        if self._shared.closed:
            raise RuntimeError(f"the edge store at {self.location} is closed")

    def _check_collection(self, collection: str) -> None:
        _check_name(collection)

    def _aliases(self) -> dict[str, str]:
        if self._shared.aliases is None:
            self._shared.aliases = read_aliases(self._shared.path)
        return self._shared.aliases

    def _name(self) -> str:
        """The shard this view writes: the collection, or the one its alias names (open shards are keyed by it)."""
        return self._aliases().get(self.collection, self.collection)

    def _dir(self) -> str:
        return os.path.join(self._shared.path, self._name())

    def _stored_sparse(self) -> dict[str, Any] | None:
        """The shard's `bm25` sparse vector config as recorded on disk; None when it has none (or no shard)."""
        config_file = os.path.join(self._dir(), _CONFIG_FILE)
        if not os.path.isfile(config_file):
            return None
        with open(config_file, encoding="utf-8") as f:
            stored = (json.load(f).get("sparse_vectors") or {}).get(SPARSE_VECTOR)
        return dict(stored) if isinstance(stored, dict) else None

    def _stored_size(self) -> int | None:
        """The vector size recorded on disk, None when the shard does not exist."""
        if os.path.isfile(os.path.join(self._shared.path, "meta.json")):
            raise SinkConfigError(
                f"{self.location} is a qdrant-client local store (meta.json), not qdrant-edge shards: "
                "open it with EMBEDWORKER_QDRANT_ENGINE=local, or give the edge engine another path"
            )
        directory = self._dir()
        config_file = os.path.join(directory, _CONFIG_FILE)
        if not os.path.isfile(config_file):
            if os.path.isdir(os.path.join(directory, "segments")):
                raise SinkConfigError(f"{directory} holds shard data without {_CONFIG_FILE}; not an edge shard this sink can open")
            return None
        with open(config_file, encoding="utf-8") as f:
            config = json.load(f)
        vectors = config.get("vectors") or {}
        if set(vectors) != {""}:
            raise SinkConfigError(f"collection {self.collection!r} has named vectors, which embedworker does not use")
        distance = vectors[""].get("distance")
        if distance is not None and str(distance).lower() != "cosine":
            raise SinkConfigError(f"collection {self.collection!r} uses {distance} distance; embedworker needs cosine")
        return int(vectors[""]["size"])

    def _open(self, create_dim: int | None = None) -> Any:
        """The collection's shard: already open, loaded from disk, or (given a dim) created."""
        import qdrant_edge as qe

        shared = self._shared
        shard = shared.shards.get(self._name())
        if shard is not None:
            return shard
        directory = self._dir()
        stored = self._stored_size()
        try:
            if stored is not None:
                shard = qe.EdgeShard.load(directory)
                dim = stored
            elif create_dim is not None:
                os.makedirs(shared.path, exist_ok=True)
                sparse = {SPARSE_VECTOR: qe.EdgeSparseVectorParams(modifier=qe.Modifier.Idf)} if self._bm25 else None
                vectors = qe.EdgeVectorParams(size=create_dim, distance=qe.Distance.Cosine,
                                              quantization_config=_edge_quantization(self.quantization))
                config = qe.EdgeConfig(vectors=vectors, sparse_vectors=sparse)
                shard = qe.EdgeShard.create(directory, config)
                dim = create_dim
            else:
                raise SinkConfigError(f"collection {self.collection!r} does not exist in {self.location}")
        except SinkConfigError:
            raise
        except Exception as exc:
            if "WouldBlock" in str(exc):
                raise SinkConfigError(
                    f"the edge shard {directory} is open elsewhere (one process per collection directory: "
                    "stop the other worker first, or use a Qdrant server)"
                ) from None
            raise
        shared.shards[self._name()] = shard
        shared.dims[self._name()] = dim
        shared.last_flush[self._name()] = time.monotonic()
        return shard

    # ---- the StoreWriter interface ----------------------------------------------------------

    async def vector_size(self) -> int | None:
        """The collection's vector size, or None when it does not exist."""

        def size() -> int | None:
            known = self._shared.dims.get(self._name())
            return known if known is not None else self._stored_size()

        return await self._call(size)

    async def ensure_collection(self, dim: int, *, model: str | None = None, model_version: str | None = None) -> None:
        import qdrant_edge as qe

        def ensure() -> None:
            size = self._shared.dims.get(self._name())
            if size is None:
                size = self._stored_size()
            named = False
            if size is None and self.versioned_collections and self.collection not in self._aliases():
                # Deterministic: a start that crashed before recording the alias finds its shard again.
                self._aliases()[self.collection] = versioned_collection(self.collection, model)
                size, named = self._stored_size(), True
            if size is not None and size != dim:
                if named:
                    self._aliases().pop(self.collection, None)
                raise SinkConfigError(
                    f"collection {self.collection!r} has vectors of size {size}, the model gives {dim}; "
                    "use another EMBEDWORKER_COLLECTION or re-embed"
                )
            if size is not None:  # an existing shard: dense-only with sparse on is refused here
                stored = self._stored_sparse()
                check_sparse_config(self.collection, self._bm25 is not None, (stored or {}).get("modifier"), present=stored is not None)
            shard = self._open(create_dim=dim)
            if named:
                write_aliases(self._shared.path, self._aliases())
                log.info("collection %s created behind the alias %s", self._aliases()[self.collection], self.collection)
            if size is not None:
                check_id_scheme(self.collection, self.sample_chunks(LEGACY_ID_SAMPLE))
                check_model(self.collection, self.sample_chunks(MODEL_SAMPLE, from_index=0), model, model_version)
            # Idempotent (a no-op when present); deletes and chunk replacement filter on these.
            kinds = {kind: getattr(qe.PayloadSchemaType, kind.capitalize()) for kind in INDEX_KINDS}
            known = shard.info().payload_schema or {}
            for field_name, kind in self.payload_indexes.items():
                if field_name not in known:
                    shard.update(qe.UpdateOperation.create_field_index(field_name, kinds[kind]))
            if self.pin_alias:
                self.collection = self._name()

        await self._call(ensure)

    def _structs(self, points: Sequence[Point]) -> list[Any]:
        """Engine points, sparse vectors included (on the sink thread: BM25 holds the GIL, a batch at a time)."""
        import qdrant_edge as qe

        return [qe.Point(p.id, vector, p.payload) for p, vector in zip(points, engine_vectors(points, self._bm25, qe.SparseVector))]

    async def write(self, writes: Sequence[DocumentWrite]) -> WriteReport:
        if not writes:
            return WriteReport()

        def write() -> WriteReport:
            report = replace_chunks(self, writes, payload_only=self.payload_only_writes)
            self._maybe_flush(self._open())
            return report

        return await self._call(write)

    # ---- ChunkEngine primitives (on the executor thread) -------------------------------------

    @property
    def vector_dim(self) -> int | None:
        return self._shared.dims.get(self._name())

    def stored_heads(self, doc_ids: Sequence[str]) -> dict[str, StoredHead]:
        by_point = {point_id(d): d for d in doc_ids}
        stored = self._open().retrieve(list(by_point), with_payload=True, with_vector=False)
        return {by_point[str(r.id)]: stored_head(r.payload or {}) for r in stored if str(r.id) in by_point}

    def delete_chunks(self, targets: Sequence[DocumentWrite]) -> None:
        import qdrant_edge as qe

        self._open().update(qe.UpdateOperation.delete_points_by_filter(surplus_filter(_EdgeTerms(), targets)))

    def upsert_points(self, points: Sequence[Point], writes: Sequence[DocumentWrite]) -> None:
        import qdrant_edge as qe

        condition = upsert_condition(_EdgeTerms(), writes) if self.conditional_writes else None
        # The engine checks the dimension itself.
        self._open().update(qe.UpdateOperation.upsert_points(self._structs(points), condition=condition))

    def overwrite_payloads(self, writes: Sequence[DocumentWrite]) -> None:
        import qdrant_edge as qe

        shard, t = self._open(), _EdgeTerms()
        for w in writes:
            point = w.points[0]
            if self.conditional_writes:
                # Chunk 0 of this id, still holding the text whose vector is kept, and not newer.
                only = t.where(must=[t.match("id", w.doc_id), t.match("chunk_index", 0),
                                     t.match("content_hash", point.payload["content_hash"]), *replaceable(t, w)])
                shard.update(qe.UpdateOperation.overwrite_payload_by_filter(only, point.payload))
            else:
                shard.update(qe.UpdateOperation.overwrite_payload([point.id], point.payload))

    def sample_chunks(self, limit: int, *, from_index: int = 1) -> list[tuple[str, dict[str, Any]]]:
        import qdrant_edge as qe

        later = qe.Filter(must=[qe.FieldCondition(key="chunk_index", range=qe.RangeFloat(gte=from_index))])
        records, _ = self._open().scroll(qe.ScrollRequest(limit=limit, filter=later, with_payload=True, with_vector=False))
        return [(str(r.id), dict(r.payload or {})) for r in records]

    def is_permanent(self, exc: BaseException) -> bool:
        # qdrant-edge raises bare Exceptions; its validation errors say what is wrong with the input.
        text = str(exc).lower()
        return any(marker in text for marker in _REJECTION_MARKERS)

    async def points(self, *, with_vectors: bool = True) -> list[StoredPoint]:
        import qdrant_edge as qe

        def scroll() -> list[StoredPoint]:
            shard = self._open()
            found: list[StoredPoint] = []
            offset = None
            while True:
                records, offset = shard.scroll(
                    qe.ScrollRequest(offset=offset, limit=1000, with_payload=True, with_vector=with_vectors)
                )
                for r in records:
                    dense, sparse = split_vector(r.vector if with_vectors else None)
                    found.append(StoredPoint(id=str(r.id), vector=dense, payload=dict(r.payload or {}), sparse=sparse))
                if offset is None:
                    return found

        return await self._call(scroll)

    def _maybe_flush(self, shard: Any) -> None:
        shared = self._shared
        now = time.monotonic()
        if now - shared.last_flush.get(self._name(), 0.0) >= shared.flush_interval_seconds:
            shard.flush()
            shared.last_flush[self._name()] = time.monotonic()

    async def flush(self) -> None:
        """Make everything upserted so far durable against power loss (msync)."""

        def flush() -> None:
            shard = self._shared.shards.get(self._name())
            if shard is not None:
                shard.flush()
                self._shared.last_flush[self._name()] = time.monotonic()

        await self._call(flush)

    async def optimize(self) -> bool:
        """Build the HNSW index; True when anything changed. Holds the GIL for seconds: offline only."""
        return bool(await self._call(lambda: self._open().optimize()))

    async def count(self) -> int:
        import qdrant_edge as qe

        return int(await self._call(lambda: self._open().count(qe.CountRequest(exact=True))))

    def _tenant_filter(self) -> Any:
        """Searches of a `for_tenant` view see only that tenant's points."""
        return None if self.tenant is None else _EdgeTerms().where(must=[_EdgeTerms().match(TENANT_FIELD, self.tenant)])

    async def search(self, vector: np.ndarray, limit: int = 5) -> list[Hit]:
        import qdrant_edge as qe

        request = qe.QueryRequest(
            limit=limit,
            query=qe.Query.Nearest(np.asarray(vector, dtype=np.float32).tolist()),
            with_payload=True,
            filter=self._tenant_filter(),
        )
        points = await self._call(lambda: self._open().query(request))
        return [Hit(id=str(p.id), score=float(p.score), payload=dict(p.payload or {})) for p in points]

    async def has_sparse(self) -> bool:
        return bool(await self._call(lambda: self._stored_sparse() is not None))

    async def search_sparse(self, sparse: SparseVector, limit: int = 5) -> list[Hit]:
        import qdrant_edge as qe

        if not sparse:
            return []  # no token to match (a query of stopwords only)
        request = qe.QueryRequest(
            limit=limit,
            query=qe.Query.Nearest(qe.SparseVector(list(sparse.indices), list(sparse.values)), using=SPARSE_VECTOR),
            with_payload=True,
            filter=self._tenant_filter(),
        )
        points = await self._call(lambda: self._open().query(request))
        return [Hit(id=str(p.id), score=float(p.score), payload=dict(p.payload or {})) for p in points]

    async def search_hybrid(self, vector: np.ndarray, sparse: SparseVector, limit: int = 5, *, k: int = RRF_K) -> list[Hit]:
        import qdrant_edge as qe

        prefetches = [qe.Prefetch(limit=limit, query=qe.Query.Nearest(np.asarray(vector, dtype=np.float32).tolist()), filter=self._tenant_filter())]
        if sparse:  # a query without tokens fuses the dense ranks alone
            prefetches.append(qe.Prefetch(
                limit=limit, query=qe.Query.Nearest(qe.SparseVector(list(sparse.indices), list(sparse.values)), using=SPARSE_VECTOR),
                filter=self._tenant_filter(),
            ))
        request = qe.QueryRequest(limit=limit, prefetches=prefetches, query=qe.Fusion.Rrf(k=k), with_payload=True, filter=self._tenant_filter())
        points = await self._call(lambda: self._open().query(request))
        return [Hit(id=str(p.id), score=float(p.score), payload=dict(p.payload or {})) for p in points]

    async def healthy(self) -> bool:
        def check() -> bool:
            shard = self._shared.shards.get(self._name())
            if shard is not None:
                shard.info()
                return True
            return os.path.isdir(self._shared.path) or os.access(os.path.dirname(self._shared.path) or ".", os.W_OK)

        try:
            return bool(await self._call(check))
        except Exception:
            return False

    async def close(self) -> None:
        shared = self._shared
        if shared.closed:
            return

        def close_all() -> None:
            errors = []
            for name, shard in list(shared.shards.items()):
                try:
                    shard.flush()
                    shard.close()
                except Exception as exc:  # close the others anyway
                    log.warning("closing edge shard %s failed: %s", name, exc)
                    errors.append(exc)
            shared.shards.clear()
            if errors:
                raise errors[0]

        try:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(shared.executor, close_all)
        finally:
            shared.closed = True
            shared.executor.shutdown(wait=False)


    # ---- StoreAdmin (the alias record and control records are files; a flip is one rename) -----

    async def alias_target(self, alias: str) -> str | None:
        return await self._call(lambda: self._aliases().get(alias))

    async def switch_alias(self, alias: str, collection: str) -> None:
        _check_name(collection)

        def switch() -> None:
            if not os.path.isfile(os.path.join(self._shared.path, collection, _CONFIG_FILE)):
                raise SinkConfigError(f"collection {collection!r} does not exist in {self.location}")
            self._aliases()[alias] = collection
            write_aliases(self._shared.path, self._aliases())

        await self._call(switch)

    async def collection_exists(self, name: str) -> bool:
        _check_name(name)
        return await self._call(lambda: os.path.isfile(os.path.join(self._shared.path, name, _CONFIG_FILE)))

    async def drop_collection(self, name: str) -> None:
        _check_name(name)

        def drop() -> None:
            if name in self._aliases().values():
                raise SinkConfigError(f"collection {name!r} is behind an alias; switch the alias first")
            shard = self._shared.shards.pop(name, None)
            if shard is not None:
                shard.close()
            self._shared.dims.pop(name, None)
            shutil.rmtree(os.path.join(self._shared.path, name), ignore_errors=True)

        await self._call(drop)

    async def read_record(self, key: str) -> Any:
        def read() -> Any:
            text = read_control(self._shared.path).get(key)
            return None if text is None else parse_record(text, f"{CONTROL_FILE}[{key!r}]")

        return await self._call(read)

    async def write_record(self, key: str, value: Any) -> None:
        def write() -> None:
            record = read_control(self._shared.path)
            if value is None:
                record.pop(key, None)
            else:
                record[key] = record_text(value)
            _replace_file(self._shared.path, CONTROL_FILE, json.dumps(record, sort_keys=True))

        await self._call(write)


def _check_name(collection: str) -> None:
    if not collection or collection in (".", "..") or "/" in collection or "\\" in collection or "\0" in collection:
        raise SinkConfigError(f"collection name {collection!r} cannot be a directory name")


class _EdgeTerms:
    """qdrant-edge's filter classes (its range class is `RangeFloat`)."""

    def __init__(self) -> None:
        import qdrant_edge as qe

        self.qe = qe

    def match(self, key: str, value: Any) -> Any:
        return self.qe.FieldCondition(key=key, match=self.qe.MatchValue(value))

    def at_least(self, key: str, value: int) -> Any:
        return self.qe.FieldCondition(key=key, range=self.qe.RangeFloat(gte=value))

    def at_most(self, key: str, value: int) -> Any:
        return self.qe.FieldCondition(key=key, range=self.qe.RangeFloat(lte=value))

    def empty(self, key: str) -> Any:
        return self.qe.IsEmptyCondition(key=key)

    def where(self, *, must: Sequence[Any] = (), should: Sequence[Any] = (), must_not: Sequence[Any] = ()) -> Any:
        return self.qe.Filter(must=list(must) or None, should=list(should) or None, must_not=list(must_not) or None)


def _edge_quantization(kind: str) -> Any:
    """qdrant-edge's quantization config for `kind` (None: none)."""
    import qdrant_edge as qe

    if kind == "int8":
        return qe.ScalarQuantizationConfig(type=qe.ScalarType.Int8, always_ram=True)
    if kind == "binary":
        return qe.BinaryQuantizationConfig(always_ram=True)
    return None
