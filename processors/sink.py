"""The vector store: one facade over a Qdrant server and qdrant-client's embedded engine.

Like qdrant-client itself, only the location differs: `url=` for a server (API key,
HTTPS), `path=` for an embedded on-disk store, or `:memory:`. Every call runs on one
dedicated thread: the embedded engine does its work inline and would otherwise block
the event loop, and one thread keeps upserts in submission order (last write wins).

Sparse vectors (`sparse="bm25"`, `processors.sparse`): each point also gets a BM25 vector
named `bm25` beside the unnamed dense one, so dense-only search code and collections keep
working; the sink computes them from the points' texts on its thread, a batch at a time, and
the collection's sparse vector carries `Modifier.IDF`. Hybrid search fuses a dense and a
sparse prefetch with the engine's reciprocal rank fusion (k = `RRF_K`).
"""

from __future__ import annotations

import logging
import re
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import numpy as np

from processors.errors import SinkConfigError, StoreRejected
from processors.sparse import RRF_K, SPARSE_OFF, SPARSE_VECTOR, SparseVector, bm25_encoder, missing_sparse_message, sparse_from
from processors.threaded import ThreadedStore
from schemas import Version, legacy_point_id, point_id, tenant_key

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Point:
    id: str
    vector: np.ndarray
    payload: dict[str, Any] = field(default_factory=dict)
    text: str | None = None
    """The text the sparse vector is computed from (the chunk's); None: the payload's `text`, if any."""


@dataclass(frozen=True, slots=True)
class DocumentWrite:
    """The new state of one document: its chunk points 0..n-1 replace all it had; no points deletes it.

    `version`: the event's place in its source's order; the write applies only where the stored
    chunks are not newer in the same source (None: unconditional, as for tests and old callers).
    """

    doc_id: str
    points: Sequence[Point] = ()
    version: Version | None = None
    tenant: str | None = None
    """Whose document (payload field `tenant`): deletes and chunk cleanup touch only that tenant's `doc_id`."""

    @property
    def key(self) -> str:
        """The document's name in point ids and per-document bookkeeping (`schemas.InputEvent.key`)."""
        return self.doc_id if self.tenant is None else tenant_key(self.tenant, self.doc_id)


@dataclass(frozen=True, slots=True)
class StoredHead:
    """What chunk 0 of a stored document says: how many chunks it has, the version that wrote it
    and the hash of its text (the cache key: model and normalized text)."""

    chunk_count: int
    version: Version | None
    content_hash: str | None = None


VERSION_FIELD = "version"
TENANT_FIELD = "tenant"
VERSION_SOURCE_FIELD = "version_source"


def stored_head(payload: dict[str, Any]) -> StoredHead:
    value, source = payload.get(VERSION_FIELD), payload.get(VERSION_SOURCE_FIELD)
    version = Version(source, value) if isinstance(value, int) and isinstance(source, str) else None
    digest = payload.get("content_hash")
    return StoredHead(int(payload.get("chunk_count", 1)), version, digest if isinstance(digest, str) else None)


def keeps_vector(write: DocumentWrite, head: StoredHead | None) -> bool:
    """Whether `write` changes only the payload of what is stored: one chunk then and now, the same text hash.

    Only single-chunk documents qualify: their one point is chunk 0, which was just read, so
    the vector a payload rewrite keeps is there. A multi-chunk document is rewritten whole (a
    crash inside an earlier write may have left a later chunk missing, which only a full
    write restores).
    """
    if head is None or head.content_hash is None or head.chunk_count != 1 or len(write.points) != 1:
        return False
    return write.points[0].payload.get("content_hash") == head.content_hash


def _rewritten(write: DocumentWrite, head: StoredHead | None) -> bool:
    """Whether a payload rewrite of `write` is what is stored now (its text, its version)."""
    if head is None or head.content_hash != write.points[0].payload.get("content_hash"):
        return False
    return write.version is None or head.version == write.version


@dataclass(frozen=True, slots=True)
class WriteReport:
    """What a store write did besides writing: documents skipped as stale, documents whose vector was kept."""

    stale: int = 0
    payload_only: int = 0


def is_stale(write: DocumentWrite, head: StoredHead | None) -> bool:
    """Whether the stored document is newer than `write` in the same source (the write must not apply)."""
    mine, theirs = write.version, head.version if head is not None else None
    return mine is not None and theirs is not None and theirs.source == mine.source and theirs.value > mine.value


@dataclass(frozen=True, slots=True)
class StoredPoint:
    id: str
    vector: np.ndarray | None
    payload: dict[str, Any]
    sparse: SparseVector | None = None


# Payload fields every engine indexes: deletes and chunk replacement filter on them.
PAYLOAD_INDEXES = {"id": "keyword", "chunk_index": "integer"}
INDEX_KINDS = ("keyword", "integer", "float", "bool", "datetime", "text", "uuid")


def parse_payload_indexes(spec: str) -> dict[str, str]:
    """`metadata.lang:keyword,metadata.ts:integer` -> {field: kind}; raises ValueError on a bad entry."""
    indexes: dict[str, str] = {}
    for entry in filter(None, (part.strip() for part in spec.split(","))):
        field_name, _, kind = entry.rpartition(":")
        if not field_name or kind not in INDEX_KINDS:
            raise ValueError(f"{entry!r}: expected field:kind with kind one of {', '.join(INDEX_KINDS)}")
        indexes[field_name] = kind
    return indexes


@dataclass(frozen=True, slots=True)
class Hit:
    id: str
    score: float
    payload: dict[str, Any]


def split_vector(vector: Any) -> tuple[np.ndarray | None, SparseVector | None]:
    """A stored point's vector as (dense, sparse): a bare list, or a dict {"": dense, "bm25": sparse}
    (both engines return the dict once a collection has a sparse vector)."""
    if vector is None:
        return None, None
    if isinstance(vector, dict):
        dense = vector.get("")
        sparse = vector.get(SPARSE_VECTOR)
        return (
            np.asarray(dense, dtype=np.float32) if dense is not None else None,
            sparse_from(sparse) if sparse is not None else None,
        )
    return np.asarray(vector, dtype=np.float32), None


def sparse_text(point: Point) -> str:
    """What a point's sparse vector is computed from: its chunk text, else its payload text, else nothing."""
    if point.text is not None:
        return point.text
    text = point.payload.get("text")
    return text if isinstance(text, str) else ""


def engine_vectors(points: Sequence[Point], bm25: Any, sparse_type: Any) -> list[Any]:
    """Each point's vector as an engine takes it: the dense list, or {"": dense, "bm25": sparse}
    when `bm25` is on (computed for the whole batch at once); `sparse_type(indices=, values=)`
    is the engine's sparse vector class."""
    sparse = bm25.documents([sparse_text(p) for p in points]) if bm25 is not None else None
    vectors: list[Any] = []
    for i, p in enumerate(points):
        dense = np.asarray(p.vector, dtype=np.float32).tolist()
        if sparse is None:
            vectors.append(dense)
        else:
            vectors.append({"": dense, SPARSE_VECTOR: sparse_type(indices=list(sparse[i].indices), values=list(sparse[i].values))})
    return vectors


def check_sparse_config(collection: str, wanted: bool, stored_modifier: str | None, *, present: bool) -> None:
    """Refuse a dense-only collection when sparse vectors are on, and a `bm25` vector without IDF
    (its scores would be term frequencies only). A sparse collection opened with sparse off is
    allowed (a worker not yet switched on), but its new points get no sparse vector: say so."""
    if wanted and not present:
        raise SinkConfigError(missing_sparse_message(collection))
    if present and (stored_modifier or "").lower() != "idf":
        raise SinkConfigError(
            f"collection {collection!r} has a {SPARSE_VECTOR!r} sparse vector without the IDF modifier; "
            "embedworker's BM25 needs it: re-embed into a new collection (embedworker reembed)"
        )
    if present and not wanted:
        log.warning(
            "collection %r has %r sparse vectors but EMBEDWORKER_SPARSE=off: points written now get none, "
            "and keyword or hybrid search will miss them", collection, SPARSE_VECTOR,
        )


class ChunkEngine(Protocol):
    """The primitives of one engine the chunk-replacement write is built from (each runs on the store's thread).

    Given versioned writes, a delete touches a stored chunk only where it is not newer in the
    write's source (or has no version); an upsert does so too where `conditional_writes` is on
    (a server, where other processes write: a write that lost a race cannot land over a newer
    one). `replace_chunks` reads chunk 0 first in every case and skips what is stale.
    """

    collection: str
    vector_dim: int | None
    """The collection's vector size once known (`ensure_collection`); None: not checked here."""

    def stored_heads(self, doc_ids: Sequence[str]) -> dict[str, StoredHead]:
        """Each stored document's chunk 0 (absent: not stored), by `DocumentWrite.key`."""
        ...

    def delete_chunks(self, targets: Sequence[DocumentWrite]) -> None:
        """Delete, for each target, its chunks from `len(target.points)` on (all of them for a delete), by payload filter."""
        ...

    def upsert_points(self, points: Sequence[Point], writes: Sequence[DocumentWrite]) -> None:
        """Upsert the points of `writes`, each point only where the stored one is not newer (see above)."""
        ...

    def overwrite_payloads(self, writes: Sequence[DocumentWrite]) -> None:
        """Replace the whole payload of each write's one point, keeping its vectors (see `keeps_vector`).

        Where `conditional_writes` is on, only where the stored point still holds the same text
        (`content_hash`) and is not newer: another writer may have replaced it since it was read."""
        ...

    def sample_chunks(self, limit: int, *, from_index: int = 1) -> list[tuple[str, dict[str, Any]]]:
        """Up to `limit` (point id, payload) of stored chunks with `chunk_index` >= `from_index` (start-up checks)."""
        ...

    def is_permanent(self, exc: BaseException) -> bool:
        """Whether the engine refused the request itself (validation, 4xx): retrying the same write cannot help."""
        ...


def replace_chunks(engine: ChunkEngine, writes: Sequence[DocumentWrite], *, payload_only: bool = True) -> WriteReport:
    """Apply document writes (at most one per id): upsert their chunks, remove every other chunk of those ids.

    Returns how many writes were skipped as stale (the stored document is newer in the same
    source: a replay, a zombie writer after a rebalance, a slow backfill; their state stays),
    and how many changed only the payload of a stored one-chunk document with the same text
    (`keeps_vector`): given `payload_only`, those rewrite the payload and keep the vector.

    Chunk 0 names how many chunks a document has (an upper bound: surplus chunks go before new
    ones are written, so a crash in between leaves it right). Only a document that may hold more
    chunks than it now gets needs a filtered delete (a scan on the local engine, an index lookup
    elsewhere). A delete always filters by id: a crash inside one (the local engine deletes point
    by point, chunk 0 first) may leave chunks without chunk 0 to count them.

    Raises `StoreRejected` for a write the engine refused on its merits (and for a non-finite
    vector, which qdrant-edge would store and never find); anything else is the engine's own error.
    """
    try:
        heads = engine.stored_heads([w.key for w in writes])
        fresh = [w for w in writes if not is_stale(w, heads.get(w.key))]
        kept = [w for w in fresh if keeps_vector(w, heads.get(w.key))] if payload_only else []
        if kept:
            engine.overwrite_payloads(kept)
            if engine.conditional_writes:
                # Another process may have written one of them between the read and the rewrite (the
                # rewrite then matched nothing): those get the full, conditional write after all.
                now = engine.stored_heads([w.key for w in kept])
                kept = [w for w in kept if _rewritten(w, now.get(w.key))]
            unchanged = {w.key for w in kept}
            fresh = [w for w in fresh if w.key not in unchanged]
        points = [p for w in fresh for p in w.points]
        if points:
            check_vectors(points, engine.vector_dim)
        targets = [w for w in fresh if not w.points or _count(heads.get(w.key)) > len(w.points)]
        if targets:  # never an empty filter: it would match every point
            engine.delete_chunks(targets)
        if points:
            engine.upsert_points(points, [w for w in fresh if w.points])
    except StoreRejected:
        raise
    except Exception as exc:
        if engine.is_permanent(exc):
            raise StoreRejected(" ".join(f"{type(exc).__name__}: {exc}".split())[:500]) from exc
        raise
    return WriteReport(stale=len(writes) - len(fresh) - len(kept), payload_only=len(kept))


class FilterTerms(Protocol):
    """An engine's filter classes under one vocabulary, so the write's filters are written once."""

    def match(self, key: str, value: Any) -> Any: ...

    def at_least(self, key: str, value: int) -> Any: ...

    def at_most(self, key: str, value: int) -> Any: ...

    def empty(self, key: str) -> Any: ...

    def where(self, *, must: Sequence[Any] = (), should: Sequence[Any] = (), must_not: Sequence[Any] = ()) -> Any: ...


def replaceable(t: FilterTerms, w: DocumentWrite) -> list[Any]:
    """Conditions a stored chunk of `w.doc_id` must meet to be replaced by `w`: its id, and not newer in `w`'s source."""
    same_id = t.match("id", w.doc_id)
    if w.tenant is not None:
        same_id = t.where(must=[same_id, t.match(TENANT_FIELD, w.tenant)])
    if w.version is None:
        return [same_id]
    not_newer = t.where(should=[
        t.where(must_not=[t.match(VERSION_SOURCE_FIELD, w.version.source)]),
        t.at_most(VERSION_FIELD, w.version.value),
        t.empty(VERSION_FIELD),
    ])
    return [same_id, not_newer]


def surplus_filter(t: FilterTerms, targets: Sequence[DocumentWrite]) -> Any:
    """The chunks the targets no longer have (all of them for a delete), where they may be replaced."""
    def clause(w: DocumentWrite) -> Any:
        if not w.points:
            return t.where(must=replaceable(t, w))
        return t.where(must=[*replaceable(t, w), t.at_least("chunk_index", len(w.points))])

    return t.where(should=[clause(w) for w in targets])


def upsert_condition(t: FilterTerms, writes: Sequence[DocumentWrite]) -> Any:
    """One condition for the batch's upsert (each stored point meets only its own document's clause); None when unversioned."""
    if all(w.version is None for w in writes):
        return None
    return t.where(should=[t.where(must=replaceable(t, w)) for w in writes])


def _count(head: StoredHead | None) -> int:
    return head.chunk_count if head is not None else 0


def version_payload(version: Version | None) -> dict[str, Any]:
    """The payload fields a point carries for the guard (none for an unversioned write)."""
    if version is None:
        return {}
    return {VERSION_FIELD: version.value, VERSION_SOURCE_FIELD: version.source}


def check_vectors(points: Sequence[Point], dim: int | None) -> None:
    """Refuse a vector that is not finite (a NaN point is never found by search) or not of the
    collection's size, before anything is sent: an engine that writes point by point would
    otherwise keep a refused document's other chunks. One vectorized pass for the usual batch."""
    size = dim if dim is not None else np.shape(points[0].vector)[0]
    if all(np.shape(p.vector) == (size,) for p in points) and np.isfinite(np.stack([p.vector for p in points])).all():
        return
    for p in points:
        vector = np.asarray(p.vector)
        what = f"of size {vector.size}, the collection's is {size}" if vector.shape != (size,) else "not finite"
        if vector.shape != (size,) or not np.isfinite(vector).all():
            raise StoreRejected(f"the vector of chunk {p.payload.get('chunk_index', 0)} of {p.payload.get('id')!r} is {what}")


LEGACY_ID_SAMPLE = 64
MODEL_SAMPLE = 16


def check_model(collection: str, samples: Sequence[tuple[str, dict[str, Any]]], model: str | None, version: str | None) -> None:
    """Refuse a collection whose points another model (or other weights of the same name) wrote.

    A model of the same vector size would otherwise write into it silently: its vectors and the
    stored ones are not comparable, and search quietly degrades.
    """
    if model is None:
        return
    for _, payload in samples:
        theirs, their_version = payload.get("model"), payload.get("model_version")
        if not isinstance(theirs, str):
            continue  # not a point embedworker wrote
        if theirs != model or (their_version is not None and their_version != version):
            found = f"{theirs}" + (f" ({their_version})" if their_version else "")
            ours = f"{model}" + (f" ({version})" if version else "")
            raise SinkConfigError(
                f"collection {collection!r} holds vectors of {found}, this worker's model is {ours}: "
                f"re-embed into a new collection (embedworker reembed --from-collection {collection} "
                "--target-collection NEW) or set EMBEDWORKER_MODEL to the collection's model"
            )


def check_id_scheme(collection: str, samples: Sequence[tuple[str, dict[str, Any]]]) -> None:
    """Refuse a collection whose chunks carry the pre-2026-12 point ids (`id#i`, which collided with ids holding `#`).

    Why refuse rather than read both schemes: every later write would pay a second filtered
    delete for ever, and chunks the collision already overwrote cannot be told from the store.
    """
    for point, payload in samples:
        doc_id, index = payload.get("id"), payload.get("chunk_index")
        if isinstance(doc_id, str) and isinstance(index, int) and index > 0 and point == legacy_point_id(doc_id, index):
            raise SinkConfigError(
                f"collection {collection!r} holds chunks under the old point-id scheme (before 2026-12), in which an "
                f"id with '#' could overwrite another document's chunk; re-embed it into a new collection "
                f"(embedworker reembed --from-collection {collection} --target-collection NEW, or --from-topic) "
                "and point EMBEDWORKER_COLLECTION at it"
            )


def versioned_collection(alias: str, model: str | None, n: int = 1) -> str:
    """The `n`th collection behind alias `alias` for `model`: `<alias>__<model slug>__<n>`.

    Deterministic, so a start that crashed between creating it and naming it finds it again."""
    slug = re.sub(r"[^a-z0-9]+", "-", (model or "model").lower().rstrip("/").rsplit("/", 1)[-1]).strip("-")[:48] or "model"
    return f"{alias}__{slug}__{n}"


QUANTIZATIONS = ("none", "int8", "binary")


def check_quantization(kind: str) -> str:
    if kind not in QUANTIZATIONS:
        raise SinkConfigError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, not {kind!r}")
    return kind


def _client_quantization(kind: str) -> Any:
    """qdrant-client's quantization config for `kind` (the quantized copy in RAM, the originals for rescoring)."""
    from qdrant_client import models

    if kind == "int8":
        return models.ScalarQuantization(scalar=models.ScalarQuantizationConfig(type=models.ScalarType.INT8, always_ram=True))
    if kind == "binary":
        return models.BinaryQuantization(binary=models.BinaryQuantizationConfig(always_ram=True))
    return None


class StoreWriter(Protocol):
    """What the write path needs from a store (the worker, Faust, reembed's target, dlq replay).

    Every engine implements it (Qdrant server, qdrant-client local, qdrant-edge) by providing the
    `ChunkEngine` primitives; `write` is `replace_chunks` over them, written once."""

    collection: str
    location: str

    def for_collection(self, collection: str) -> "StoreWriter":
        """The same engine on another collection (close only the original)."""
        ...

    async def vector_size(self) -> int | None:
        """The collection's vector size, or None when it does not exist."""
        ...

    async def ensure_collection(self, dim: int, *, model: str | None = None, model_version: str | None = None) -> None:
        """Create the collection, or check an existing one: vector size, sparse config, id scheme and,
        given `model`, that no other model's points are in it (`SinkConfigError`)."""
        ...

    async def write(self, writes: Sequence[DocumentWrite]) -> WriteReport:
        """Apply document writes (at most one per id, see `replace_chunks`): how many were stale, how many kept their vector."""
        ...

    async def healthy(self) -> bool: ...

    async def close(self) -> None: ...


class StoreSearch(Protocol):
    """What `embedworker search` and the recall bench need: dense, sparse and hybrid queries."""

    async def search(self, vector: np.ndarray, limit: int = 5) -> list[Hit]: ...

    async def has_sparse(self) -> bool:
        """Whether the collection exists and has the `bm25` sparse vector."""
        ...

    async def search_sparse(self, sparse: SparseVector, limit: int = 5) -> list[Hit]:
        """The best `limit` points by BM25 (IDF from the engine); none for a query without tokens."""
        ...

    async def search_hybrid(self, vector: np.ndarray, sparse: SparseVector, limit: int = 5, *, k: int = RRF_K) -> list[Hit]:
        """Dense and sparse candidates (`limit` each) fused by reciprocal rank fusion (constant `k`)."""
        ...


class StoreExport(Protocol):
    """What `reembed --from-collection` and `demo` read back: every point, and how many."""

    async def count(self) -> int: ...

    async def points(self, *, with_vectors: bool = True) -> list[StoredPoint]:
        """Every point, in id order."""
        ...


class StoreAdmin(Protocol):
    """Collections and aliases by name, and small JSON control records (`embedworker migrate`).

    A record is kept by the store itself, so every worker that writes the store sees it: on
    qdrant-client engines the payload of one point per key in the `CONTROL_COLLECTION`, on
    qdrant-edge a file beside the alias record. Values read back are untrusted (validated by
    their reader)."""

    async def alias_target(self, alias: str) -> str | None:
        """The collection `alias` names; None when it is no alias."""
        ...

    async def switch_alias(self, alias: str, collection: str) -> None:
        """Point `alias` at `collection` in one step (readers see the old or the new, never none)."""
        ...

    async def collection_exists(self, name: str) -> bool: ...

    async def drop_collection(self, name: str) -> None: ...

    async def read_record(self, key: str) -> Any:
        """The JSON value stored under `key` (None: none)."""
        ...

    async def write_record(self, key: str, value: Any) -> None:
        """Store a JSON value under `key` (None deletes it)."""
        ...


class VectorStore(StoreWriter, StoreSearch, StoreExport, StoreAdmin, Protocol):
    """A whole store, as `build_sink` returns it; each caller asks only for the part it uses."""


CONTROL_COLLECTION = "embedworker_control"
"""Where qdrant-client engines keep control records: one point per key, a 1-value vector, the value as JSON text."""
MAX_RECORD_BYTES = 64 * 1024


def record_text(value: Any) -> str:
    import orjson

    text = orjson.dumps(value).decode()
    if len(text) > MAX_RECORD_BYTES:
        raise SinkConfigError(f"a control record is {len(text)} bytes, over {MAX_RECORD_BYTES}")
    return text


def parse_record(text: Any, where: str) -> Any:
    import orjson

    if not isinstance(text, str) or len(text) > MAX_RECORD_BYTES:
        raise SinkConfigError(f"the control record in {where} is not JSON text under {MAX_RECORD_BYTES} bytes")
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        raise SinkConfigError(f"the control record in {where} is not JSON") from None


class QdrantSink(ThreadedStore):
    """Qdrant through qdrant-client.

    Keyword-only settings:
    - `collection`: collection name (created on first use with cosine distance).
    - `url`, `api_key`: a Qdrant server (`https://` for TLS); or
    - `path`: directory of an embedded store (one process at a time); or neither: in memory.
    - `timeout_seconds`: per request to a server.
    - `payload_indexes`: extra payload indexes, {field: kind} (`id` and `chunk_index` always);
      qdrant-client's local engine ignores indexes (it scans).
    - `sparse`: `off` (default) or `bm25`: a BM25 vector per point beside the dense one
      (`processors.sparse`); a dense-only collection is then a `SinkConfigError`.
    - `conditional_writes`: the version guard also inside the engine (a conditional upsert);
      default: on a server only. An embedded store is one process's (its path is locked) and
      every write goes through this sink's one thread, so the read of chunk 0 before a write is
      exact there, and the local engine evaluates the condition in Python (~11x slower batches:
      `python -m bench.host_costs`).
    - `quantization`: `none` (default), `int8` or `binary`, for a collection created here.
    - `versioned_collections`: a collection created here is `versioned_collection(collection,
      model)` behind the alias `collection`, which every read and write goes through (Qdrant
      resolves aliases); an existing collection or alias is used as it is. Default off.
    - `payload_only_writes`: an update of a one-chunk document whose text hashes as the stored
      one's rewrites only the payload and keeps the vector (default on; `keeps_vector`).
    """

    def __init__(
        self,
        *,
        collection: str,
        url: str | None = None,
        api_key: str | None = None,
        path: str | None = None,
        timeout_seconds: float = 10.0,
        payload_indexes: dict[str, str] | None = None,
        sparse: str = SPARSE_OFF,
        conditional_writes: bool | None = None,
        payload_only_writes: bool = True,
        quantization: str = "none",
        versioned_collections: bool = False,
    ) -> None:
        from qdrant_client import QdrantClient

        if url and path:
            raise SinkConfigError("give a Qdrant url or a path, not both")
        self.collection = collection
        self._dims: dict[str, int] = {}  # by collection, shared with `for_collection` views
        self.sparse = sparse
        self._bm25 = bm25_encoder(sparse)  # before the client: a missing qdrant-edge fails first
        self.payload_indexes = {**PAYLOAD_INDEXES, **(payload_indexes or {})}
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qdrant")
        self._server = bool(url)
        self.conditional_writes = self._server if conditional_writes is None else conditional_writes
        self.payload_only_writes = payload_only_writes
        self.quantization = check_quantization(quantization)
        self.versioned_collections = versioned_collections
        if url:
            self._client = QdrantClient(url=url, api_key=api_key, timeout=int(timeout_seconds))
            self.location = url
        else:
            try:
                self._client = QdrantClient(path=path) if path else QdrantClient(location=":memory:")
            except RuntimeError as exc:
                if "already accessed" in str(exc):  # qdrant-client's own wording for a locked path
                    raise SinkConfigError(
                        f"the Qdrant store {path} is open in another process (one process per path: "
                        "stop the worker first, or use a Qdrant server)"
                    ) from None
                raise
            self.location = path or ":memory:"

    def _executor(self) -> ThreadPoolExecutor:
        return self._thread

    async def vector_size(self) -> int | None:
        """The collection's vector size, or None when it does not exist."""

        def size() -> int | None:
            if not self._client.collection_exists(self.collection):
                return None
            vectors = self._client.get_collection(self.collection).config.params.vectors
            size = getattr(vectors, "size", None)
            if size is None:
                raise SinkConfigError(f"collection {self.collection!r} has named vectors, which embedworker does not use")
            return int(size)

        return await self._call(size)

    async def ensure_collection(self, dim: int, *, model: str | None = None, model_version: str | None = None) -> None:
        from qdrant_client import models

        def exists() -> bool:
            return self._client.collection_exists(self.collection) or (
                self.versioned_collections and self._alias_target() is not None
            )

        def ensure() -> None:
            if exists():
                info = self._client.get_collection(self.collection)
                vectors = info.config.params.vectors
                size = getattr(vectors, "size", None)
                if size != dim:
                    raise SinkConfigError(
                        f"collection {self.collection!r} has vectors of size {size}, the model gives {dim}; "
                        "use another EMBEDWORKER_COLLECTION or re-embed"
                    )
                stored = (info.config.params.sparse_vectors or {}).get(SPARSE_VECTOR)
                modifier = getattr(getattr(stored, "modifier", None), "value", None)
                check_sparse_config(self.collection, self._bm25 is not None, modifier, present=stored is not None)
                check_id_scheme(self.collection, self.sample_chunks(LEGACY_ID_SAMPLE))
                check_model(self.collection, self.sample_chunks(MODEL_SAMPLE, from_index=0), model, model_version)
                return
            target = versioned_collection(self.collection, model) if self.versioned_collections else self.collection
            try:
                if target == self.collection or not self._client.collection_exists(target):
                    self._client.create_collection(
                        target,
                        vectors_config=models.VectorParams(size=dim, distance=models.Distance.COSINE),
                        quantization_config=_client_quantization(self.quantization),
                        sparse_vectors_config=(
                            {SPARSE_VECTOR: models.SparseVectorParams(modifier=models.Modifier.IDF)} if self._bm25 else None
                        ),
                    )
                if target != self.collection:
                    self._client.update_collection_aliases(change_aliases_operations=[models.CreateAliasOperation(
                        create_alias=models.CreateAlias(collection_name=target, alias_name=self.collection))])
                    log.info("collection %s created behind the alias %s", target, self.collection)
            except Exception:
                # Another member of the group created it meanwhile (409 Conflict): check its size.
                if not exists():
                    raise
                ensure()

        def index() -> None:
            if not self._server:
                return  # qdrant-client's local engine ignores payload indexes (it scans)
            existing = self._client.get_collection(self.collection).payload_schema or {}
            schema = {kind: getattr(models.PayloadSchemaType, kind.upper()) for kind in INDEX_KINDS}
            for field_name, kind in self.payload_indexes.items():
                if field_name not in existing:  # idempotent on a server too; skip the round trip
                    field_schema = schema[kind]
                    if field_name == TENANT_FIELD and kind == "keyword":  # co-locates each tenant's points (Qdrant 1.11+)
                        field_schema = models.KeywordIndexParams(type=models.KeywordIndexType.KEYWORD, is_tenant=True)
                    self._client.create_payload_index(self.collection, field_name=field_name, field_schema=field_schema, wait=True)

        await self._call(ensure)
        await self._call(index)
        if self.pin_alias and (target := await self._call(self._alias_target)) is not None:
            self.collection = target
        self._dims[self.collection] = dim

    @property
    def vector_dim(self) -> int | None:
        return self._dims.get(self.collection)

    def _batch(self, points: Sequence[Point]) -> Any:
        """The points in the column form, sparse vectors included (on the sink thread: BM25 holds the GIL).

        One `Batch` of ids, vectors and payloads is one model to build and validate instead of a
        `PointStruct` a point, and leaves no object a point behind for the collector
        (`python -m bench.host_costs`, `client_points`). REST sends it as it is; over gRPC
        qdrant-client converts it a point at a time itself, as it did the list."""
        from qdrant_client import models

        vectors = engine_vectors(points, self._bm25, models.SparseVector)
        if self._bm25 is not None:  # {"": dense, "bm25": sparse} a point -> {name: [a vector a point]}
            vectors = {name: [v[name] for v in vectors] for name in vectors[0]}
        return models.Batch(ids=[p.id for p in points], vectors=vectors, payloads=[p.payload for p in points])

    async def write(self, writes: Sequence[DocumentWrite]) -> WriteReport:
        return await self._call(replace_chunks, self, writes, payload_only=self.payload_only_writes) if writes else WriteReport()

    # ---- ChunkEngine primitives (on the sink thread) ----------------------------------------

    def stored_heads(self, doc_ids: Sequence[str]) -> dict[str, StoredHead]:
        by_point = {point_id(d): d for d in doc_ids}
        stored = self._client.retrieve(
            self.collection, ids=list(by_point), with_payload=["chunk_count", "content_hash", VERSION_FIELD, VERSION_SOURCE_FIELD]
        )
        return {by_point[str(r.id)]: stored_head(r.payload or {}) for r in stored if str(r.id) in by_point}

    def delete_chunks(self, targets: Sequence[DocumentWrite]) -> None:
        from qdrant_client import models

        t = _ClientTerms()
        # The MatchAny prefilter narrows the scan of the local engine ~10x; a server uses its index.
        ids = models.FieldCondition(key="id", match=models.MatchAny(any=[w.doc_id for w in targets]))
        selector = models.FilterSelector(filter=t.where(must=[ids, surplus_filter(t, targets)]))
        self._client.delete(self.collection, points_selector=selector, wait=True)

    def upsert_points(self, points: Sequence[Point], writes: Sequence[DocumentWrite]) -> None:
        condition = upsert_condition(_ClientTerms(), writes) if self.conditional_writes else None
        self._client.upsert(self.collection, points=self._batch(points), wait=True, update_filter=condition)

    def _alias_target(self, name: str | None = None) -> str | None:
        """The collection the alias `name` (default: `collection`) names (None: no such alias)."""
        name = name or self.collection
        for alias in self._client.get_aliases().aliases:
            if alias.alias_name == name:
                return alias.collection_name
        return None

    # ---- StoreAdmin -------------------------------------------------------------------------

    async def alias_target(self, alias: str) -> str | None:
        return await self._call(self._alias_target, alias)

    async def switch_alias(self, alias: str, collection: str) -> None:
        from qdrant_client import models

        def switch() -> None:
            operations: list[Any] = []
            if self._alias_target(alias) is not None:
                operations.append(models.DeleteAliasOperation(delete_alias=models.DeleteAlias(alias_name=alias)))
            operations.append(models.CreateAliasOperation(create_alias=models.CreateAlias(collection_name=collection, alias_name=alias)))
            self._client.update_collection_aliases(change_aliases_operations=operations)  # one request: atomic on a server

        await self._call(switch)

    async def collection_exists(self, name: str) -> bool:
        return bool(await self._call(self._client.collection_exists, name))

    async def drop_collection(self, name: str) -> None:
        await self._call(self._client.delete_collection, name)

    def _record_id(self, key: str) -> str:
        return str(uuid.uuid5(uuid.NAMESPACE_URL, f"embedworker-control:{key}"))

    async def read_record(self, key: str) -> Any:
        def read() -> Any:
            if not self._client.collection_exists(CONTROL_COLLECTION):
                return None
            found = self._client.retrieve(CONTROL_COLLECTION, ids=[self._record_id(key)], with_payload=True)
            if not found:
                return None
            return parse_record((found[0].payload or {}).get("value"), f"{CONTROL_COLLECTION}[{key!r}]")

        return await self._call(read)

    async def write_record(self, key: str, value: Any) -> None:
        from qdrant_client import models

        def write() -> None:
            if value is None:
                if self._client.collection_exists(CONTROL_COLLECTION):
                    self._client.delete(CONTROL_COLLECTION, points_selector=models.PointIdsList(points=[self._record_id(key)]), wait=True)
                return
            if not self._client.collection_exists(CONTROL_COLLECTION):
                try:
                    self._client.create_collection(
                        CONTROL_COLLECTION, vectors_config=models.VectorParams(size=1, distance=models.Distance.COSINE))
                except Exception:
                    if not self._client.collection_exists(CONTROL_COLLECTION):  # not another writer's create
                        raise
            point = models.PointStruct(id=self._record_id(key), vector=[1.0], payload={"key": key, "value": record_text(value)})
            self._client.upsert(CONTROL_COLLECTION, points=[point], wait=True)

        await self._call(write)

    def overwrite_payloads(self, writes: Sequence[DocumentWrite]) -> None:
        from qdrant_client import models

        t = _ClientTerms()
        operations = []
        for w in writes:
            point = w.points[0]
            if self.conditional_writes:
                # Only over the text whose vector is kept, and (as the upsert's condition) never over a
                # newer version that landed since chunk 0 was read.
                same_text = t.match("content_hash", point.payload["content_hash"])
                target = models.SetPayload(payload=point.payload, filter=t.where(
                    must=[models.HasIdCondition(has_id=[point.id]), same_text, *replaceable(t, w)]))
            else:
                target = models.SetPayload(payload=point.payload, points=[point.id])
            operations.append(models.OverwritePayloadOperation(overwrite_payload=target))
        self._client.batch_update_points(self.collection, update_operations=operations, wait=True)

    def sample_chunks(self, limit: int, *, from_index: int = 1) -> list[tuple[str, dict[str, Any]]]:
        from qdrant_client import models

        later = models.Filter(must=[models.FieldCondition(key="chunk_index", range=models.Range(gte=from_index))])
        records, _ = self._client.scroll(
            self.collection, scroll_filter=later, limit=limit, with_payload=["id", "chunk_index", "model", "model_version"],
            with_vectors=False,
        )
        return [(str(r.id), dict(r.payload or {})) for r in records]

    def is_permanent(self, exc: BaseException) -> bool:
        from qdrant_client.http.exceptions import UnexpectedResponse

        if isinstance(exc, UnexpectedResponse):
            # 401/403/404 are the deployment (key, collection) and 408/429/5xx the moment: not this document.
            return exc.status_code in (400, 413, 422)
        # Client-side validation (pydantic, the local engine's ValueError) names what is wrong with the write;
        # the local engine also says "not found" for a deleted collection, which is an outage for every document.
        return isinstance(exc, (ValueError, TypeError)) and "not found" not in str(exc)

    async def points(self, *, with_vectors: bool = True) -> list[StoredPoint]:
        found: list[StoredPoint] = []
        offset = None
        while True:
            records, offset = await self._call(
                self._client.scroll, self.collection, limit=1000, offset=offset, with_payload=True, with_vectors=with_vectors
            )
            for r in records:
                dense, sparse = split_vector(r.vector if with_vectors else None)
                found.append(StoredPoint(id=str(r.id), vector=dense, payload=dict(r.payload or {}), sparse=sparse))
            if offset is None:
                return found

    async def count(self) -> int:
        result = await self._call(self._client.count, self.collection, exact=True)
        return int(result.count)

    def _tenant_filter(self) -> Any:
        """Searches of a `for_tenant` view see only that tenant's points."""
        from qdrant_client import models

        if self.tenant is None:
            return None
        return models.Filter(must=[models.FieldCondition(key=TENANT_FIELD, match=models.MatchValue(value=self.tenant))])

    async def search(self, vector: np.ndarray, limit: int = 5) -> list[Hit]:
        response = await self._call(
            self._client.query_points,
            self.collection,
            query=vector.astype(np.float32).tolist(),
            limit=limit,
            with_payload=True,
            query_filter=self._tenant_filter(),
        )
        return [Hit(id=str(p.id), score=float(p.score), payload=dict(p.payload or {})) for p in response.points]

    async def has_sparse(self) -> bool:
        def check() -> bool:
            if not self._client.collection_exists(self.collection):
                return False
            return SPARSE_VECTOR in (self._client.get_collection(self.collection).config.params.sparse_vectors or {})

        return bool(await self._call(check))

    async def search_sparse(self, sparse: SparseVector, limit: int = 5) -> list[Hit]:
        from qdrant_client import models

        if not sparse:
            return []  # no token to match (a query of stopwords only)
        response = await self._call(
            self._client.query_points,
            self.collection,
            query=models.SparseVector(indices=list(sparse.indices), values=list(sparse.values)),
            using=SPARSE_VECTOR,
            limit=limit,
            with_payload=True,
            query_filter=self._tenant_filter(),
        )
        return [Hit(id=str(p.id), score=float(p.score), payload=dict(p.payload or {})) for p in response.points]

    async def search_hybrid(self, vector: np.ndarray, sparse: SparseVector, limit: int = 5, *, k: int = RRF_K) -> list[Hit]:
        from qdrant_client import models

        only = self._tenant_filter()
        prefetch = [models.Prefetch(query=np.asarray(vector, dtype=np.float32).tolist(), limit=limit, filter=only)]
        if sparse:  # a query without tokens fuses the dense ranks alone
            prefetch.append(models.Prefetch(
                query=models.SparseVector(indices=list(sparse.indices), values=list(sparse.values)), using=SPARSE_VECTOR, limit=limit, filter=only,
            ))
        # RrfQuery, not FusionQuery(RRF): that one fixes k at 2. A server needs v1.16+ for it.
        response = await self._call(
            self._client.query_points,
            self.collection,
            prefetch=prefetch,
            query=models.RrfQuery(rrf=models.Rrf(k=k)),
            limit=limit,
            with_payload=True,
            query_filter=self._tenant_filter(),
        )
        return [Hit(id=str(p.id), score=float(p.score), payload=dict(p.payload or {})) for p in response.points]

    async def healthy(self) -> bool:
        try:
            await self._call(self._client.collection_exists, self.collection)
        except Exception:
            return False
        return True

    async def close(self) -> None:
        try:
            await self._call(self._client.close)
        finally:
            self._thread.shutdown(wait=False)


class _ClientTerms:
    """qdrant-client's filter models (a server and the local engine)."""

    def __init__(self) -> None:
        from qdrant_client import models

        self.m = models

    def match(self, key: str, value: Any) -> Any:
        return self.m.FieldCondition(key=key, match=self.m.MatchValue(value=value))

    def at_least(self, key: str, value: int) -> Any:
        return self.m.FieldCondition(key=key, range=self.m.Range(gte=value))

    def at_most(self, key: str, value: int) -> Any:
        return self.m.FieldCondition(key=key, range=self.m.Range(lte=value))

    def empty(self, key: str) -> Any:
        return self.m.IsEmptyCondition(is_empty=self.m.PayloadField(key=key))

    def where(self, *, must: Sequence[Any] = (), should: Sequence[Any] = (), must_not: Sequence[Any] = ()) -> Any:
        return self.m.Filter(must=list(must) or None, should=list(should) or None, must_not=list(must_not) or None)
