"""The vector store: one facade over a Qdrant server and qdrant-client's embedded engine.

Like qdrant-client itself, only the location differs: `url=` for a server (API key,
HTTPS), `path=` for an embedded on-disk store, or `:memory:`. Every call runs on one
dedicated thread: the embedded engine does its work inline and would otherwise block
the event loop, and one thread keeps upserts in submission order (last write wins).
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import numpy as np

from processors.threaded import ThreadedStore
from schemas import point_id

log = logging.getLogger(__name__)


class SinkConfigError(Exception):
    """The store cannot be used as configured (e.g. a dimension mismatch); fatal at start-up."""


@dataclass(frozen=True, slots=True)
class Point:
    id: str
    vector: np.ndarray
    payload: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class DocumentWrite:
    """The new state of one document: its chunk points 0..n-1 replace all it had; no points deletes it."""

    doc_id: str
    points: Sequence[Point] = ()


@dataclass(frozen=True, slots=True)
class StoredPoint:
    id: str
    vector: np.ndarray | None
    payload: dict[str, Any]


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


class VectorSink(Protocol):
    """The one store interface every engine implements (Qdrant server, qdrant-client local, qdrant-edge)."""

    collection: str
    location: str

    def for_collection(self, collection: str) -> "VectorSink":
        """The same engine on another collection (close only the original)."""
        ...

    async def vector_size(self) -> int | None:
        """The collection's vector size, or None when it does not exist."""
        ...

    async def ensure_collection(self, dim: int) -> None: ...

    async def upsert(self, points: Sequence[Point]) -> None: ...

    async def write(self, writes: Sequence[DocumentWrite]) -> None:
        """Apply document writes (at most one per id): upsert their chunks, remove every other chunk of those ids."""
        ...

    async def count(self) -> int: ...

    async def points(self, *, with_vectors: bool = True) -> list[StoredPoint]:
        """Every point (tests, re-embedding, checks)."""
        ...

    async def retrieve(self, ids: Sequence[str]) -> dict[str, tuple[np.ndarray, dict[str, Any]]]: ...

    async def scroll_ids(self) -> list[str]: ...

    async def search(self, vector: np.ndarray, limit: int = 5) -> list[Hit]: ...

    async def healthy(self) -> bool: ...

    async def close(self) -> None: ...


class QdrantSink(ThreadedStore):
    """Qdrant through qdrant-client.

    Keyword-only settings:
    - `collection`: collection name (created on first use with cosine distance).
    - `url`, `api_key`: a Qdrant server (`https://` for TLS); or
    - `path`: directory of an embedded store (one process at a time); or neither: in memory.
    - `timeout_seconds`: per request to a server.
    - `payload_indexes`: extra payload indexes, {field: kind} (`id` and `chunk_index` always);
      qdrant-client's local engine ignores indexes (it scans).
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
    ) -> None:
        from qdrant_client import QdrantClient

        if url and path:
            raise SinkConfigError("give a Qdrant url or a path, not both")
        self.collection = collection
        self.payload_indexes = {**PAYLOAD_INDEXES, **(payload_indexes or {})}
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qdrant")
        self._server = bool(url)
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

    async def ensure_collection(self, dim: int) -> None:
        from qdrant_client import models

        def ensure() -> None:
            if self._client.collection_exists(self.collection):
                info = self._client.get_collection(self.collection)
                vectors = info.config.params.vectors
                size = getattr(vectors, "size", None)
                if size != dim:
                    raise SinkConfigError(
                        f"collection {self.collection!r} has vectors of size {size}, the model gives {dim}; "
                        "use another EMBEDWORKER_COLLECTION or re-embed"
                    )
                return
            try:
                self._client.create_collection(
                    self.collection,
                    vectors_config=models.VectorParams(size=dim, distance=models.Distance.COSINE),
                )
            except Exception:
                # Another member of the group created it meanwhile (409 Conflict): check its size.
                if not self._client.collection_exists(self.collection):
                    raise
                ensure()

        def index() -> None:
            if not self._server:
                return  # qdrant-client's local engine ignores payload indexes (it scans)
            existing = self._client.get_collection(self.collection).payload_schema or {}
            schema = {kind: getattr(models.PayloadSchemaType, kind.upper()) for kind in INDEX_KINDS}
            for field_name, kind in self.payload_indexes.items():
                if field_name not in existing:  # idempotent on a server too; skip the round trip
                    self._client.create_payload_index(self.collection, field_name=field_name, field_schema=schema[kind], wait=True)

        await self._call(ensure)
        await self._call(index)

    async def upsert(self, points: Sequence[Point]) -> None:
        from qdrant_client import models

        if not points:
            return
        structs = [
            models.PointStruct(id=p.id, vector=p.vector.astype(np.float32).tolist(), payload=p.payload)
            for p in points
        ]
        await self._call(self._client.upsert, self.collection, points=structs, wait=True)

    async def write(self, writes: Sequence[DocumentWrite]) -> None:
        from qdrant_client import models

        if not writes:
            return
        structs = [
            models.PointStruct(id=p.id, vector=np.asarray(p.vector, dtype=np.float32).tolist(), payload=p.payload)
            for w in writes
            for p in w.points
        ]

        def surplus_filter(targets: Sequence[DocumentWrite]) -> Any:
            def clause(w: DocumentWrite) -> Any:
                same_id = models.FieldCondition(key="id", match=models.MatchValue(value=w.doc_id))
                if not w.points:
                    return models.Filter(must=[same_id])
                return models.Filter(must=[same_id, models.FieldCondition(key="chunk_index", range=models.Range(gte=len(w.points)))])

            # The MatchAny prefilter narrows the scan of the local engine ~10x; a server uses its index.
            ids = models.FieldCondition(key="id", match=models.MatchAny(any=[w.doc_id for w in targets]))
            return models.Filter(must=[ids], should=[clause(w) for w in targets])

        def apply() -> None:
            # Chunk 0 names how many chunks a document has (an upper bound: surplus chunks go
            # before new ones are written, so a crash in between leaves it right). Only a
            # document that may hold more chunks than it now gets needs a filtered delete,
            # which the local engine runs as a scan and a server as an index lookup.
            stored = self._client.retrieve(self.collection, ids=[point_id(w.doc_id) for w in writes], with_payload=["chunk_count"])
            counts = {str(r.id): int((r.payload or {}).get("chunk_count", 1)) for r in stored}
            # A delete always filters by id: a crash inside one (the local engine deletes point by
            # point, chunk 0 first) may leave chunks without chunk 0 to count them.
            targets = [w for w in writes if not w.points or counts.get(point_id(w.doc_id), 0) > len(w.points)]
            if targets:
                self._client.delete(self.collection, points_selector=models.FilterSelector(filter=surplus_filter(targets)), wait=True)
            if structs:
                self._client.upsert(self.collection, points=structs, wait=True)

        await self._call(apply)

    async def points(self, *, with_vectors: bool = True) -> list[StoredPoint]:
        found: list[StoredPoint] = []
        offset = None
        while True:
            records, offset = await self._call(
                self._client.scroll, self.collection, limit=1000, offset=offset, with_payload=True, with_vectors=with_vectors
            )
            for r in records:
                vector = np.asarray(r.vector, dtype=np.float32) if with_vectors and r.vector is not None else None
                found.append(StoredPoint(id=str(r.id), vector=vector, payload=dict(r.payload or {})))
            if offset is None:
                return found

    async def count(self) -> int:
        result = await self._call(self._client.count, self.collection, exact=True)
        return int(result.count)

    async def retrieve(self, ids: Sequence[str]) -> dict[str, tuple[np.ndarray, dict[str, Any]]]:
        records = await self._call(
            self._client.retrieve, self.collection, ids=list(ids), with_vectors=True, with_payload=True
        )
        return {str(r.id): (np.asarray(r.vector, dtype=np.float32), dict(r.payload or {})) for r in records}

    async def scroll_ids(self) -> list[str]:
        """Every point id (for tests and re-embedding)."""
        ids: list[str] = []
        offset = None
        while True:
            records, offset = await self._call(
                self._client.scroll, self.collection, limit=1000, offset=offset, with_payload=False
            )
            ids.extend(str(r.id) for r in records)
            if offset is None:
                return ids

    async def search(self, vector: np.ndarray, limit: int = 5) -> list[Hit]:
        response = await self._call(
            self._client.query_points,
            self.collection,
            query=vector.astype(np.float32).tolist(),
            limit=limit,
            with_payload=True,
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
