"""`embedworker search`: the nearest documents to a query (best chunk per document).

Three modes: `dense` (the model's vector, the default), `sparse` (BM25 only: the collection's
`bm25` sparse vector, EMBEDWORKER_SPARSE=bm25 at ingest) and `hybrid` (both, fused by the
engine's reciprocal rank fusion, k = 60). `query_sink` is the one search path: the command and
the recall benchmark (`bench/scenarios/recall.py`) both go through it.
"""

from __future__ import annotations

import asyncio
from typing import Any, Sequence

from streams.config import Settings
from streams.commands.common import UserError, _load_embedder, _open_sink, _vector_size
from streams.terminal import printable

MODES = ("dense", "sparse", "hybrid")
OVERSAMPLE = 4
"""Chunks asked per document wanted: a long document may fill several of the top ranks."""


def best_per_document(hits: Sequence[Any], limit: int) -> list[Any]:
    """Each document's best-ranked chunk, in rank order, at most `limit` documents."""
    best: dict[str, Any] = {}
    for hit in hits:
        best.setdefault(str(hit.payload.get("id", hit.id)), hit)
    return list(best.values())[:limit]


async def query_sink(
    sink: Any, query: str, *, limit: int = 5, mode: str = "dense", embedder: Any = None, encoder: Any = None,
    rrf_k: int | None = None,
) -> list[Any]:
    """The `limit` best documents of an open sink for `query` (best chunk each).

    `embedder` (dense, hybrid) embeds the query off the event loop; `encoder`
    (`processors.sparse.Bm25Encoder`; sparse, hybrid) gives its BM25 vector; `rrf_k`: the
    fusion constant of hybrid (default `processors.sparse.RRF_K`, 60).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    loop = asyncio.get_running_loop()
    vector = None
    if mode != "sparse":
        vector = (await loop.run_in_executor(None, embedder.embed, [query])).vectors[0]
    chunks = limit * OVERSAMPLE
    if mode == "dense":
        hits = await sink.search(vector, limit=chunks)
    elif mode == "sparse":
        hits = await sink.search_sparse(encoder.query(query), limit=chunks)
    else:
        fusion = {} if rrf_k is None else {"k": rrf_k}
        hits = await sink.search_hybrid(vector, encoder.query(query), limit=chunks, **fusion)
    return best_per_document(hits, limit)


async def search(
    settings: Settings, query: str, *, limit: int = 5, embedder: Any = None, mode: str = "dense", rrf_k: int | None = None,
    tenant: str | None = None,
) -> list[Any]:
    """The `limit` nearest documents of the configured collection to `query` (see `MODES`; `rrf_k`: see `query_sink`);
    with tenants configured (`EMBEDWORKER_TENANT_FROM`), `tenant`'s documents only."""
    from processors.errors import SinkConfigError
    from processors.sparse import Bm25Encoder
    from schemas import InvalidEvent
    from schemas.tenancy import check_tenant

    if not query.strip():
        raise UserError("the query is empty")
    if settings.tenant_from and tenant is None:
        raise UserError("tenants are configured (EMBEDWORKER_TENANT_FROM): give --tenant")
    if tenant is not None:
        try:
            check_tenant(tenant, "--tenant")
        except InvalidEvent as exc:
            raise UserError(exc.message) from None
    if tenant is not None and settings.tenancy == "collection":
        from processors.tenant_store import collection_of

        owner = _open_sink(settings, collection_of(settings.collection_template, settings.collection, tenant))
    else:
        owner = _open_sink(settings)
    sink = owner.for_tenant(tenant) if tenant is not None else owner
    try:
        size = await _vector_size(sink)
        if size is None:
            raise UserError(f"collection {sink.collection!r} does not exist in {sink.location}")
        encoder = None
        if mode != "dense":
            if not await sink.has_sparse():
                raise UserError(
                    f"collection {sink.collection!r} has no BM25 sparse vectors (it was filled with EMBEDWORKER_SPARSE=off): "
                    "search it without --sparse/--hybrid, or re-embed it with EMBEDWORKER_SPARSE=bm25 (embedworker reembed)"
                )
            try:
                encoder = Bm25Encoder()
            except SinkConfigError as exc:
                raise UserError(str(exc)) from None
        loop = asyncio.get_running_loop()
        if mode != "sparse":
            if embedder is None:
                settings = await _served_model(settings, sink)
                embedder = await loop.run_in_executor(None, _load_embedder, settings)
            if size != embedder.dim:
                raise UserError(
                    f"collection {sink.collection!r} has vectors of size {size}, model {settings.model!r} gives {embedder.dim}; "
                    "search with the model that filled it (--model)"
                )
        return await query_sink(sink, query, limit=limit, mode=mode, embedder=embedder, encoder=encoder, rrf_k=rrf_k)
    finally:
        await owner.close()


async def _served_model(settings: Settings, sink: Any) -> Settings:
    """The model of the collection the alias names now: a migration's record says which side that is
    (`embedworker migrate`), so a query after `cutover` or `rollback` is embedded as its collection was."""
    from processors.errors import SinkConfigError
    from streams.migration import read_migration

    try:
        migration = await read_migration(sink, settings.collection)
    except SinkConfigError as exc:
        raise UserError(str(exc)) from None
    if migration is None:
        return settings
    served = migration.served
    return settings.replace(model=served.model, dimensions=served.dimensions, embedder=served.embedder,
                            embeddings_url=served.embeddings_url or settings.embeddings_url)


def format_hits(hits: Sequence[Any], *, width: int = 80) -> list[str]:
    """One line per hit: score, id (chunk), text cut to `width`; ids and texts come from
    producers, so both are escaped (`streams.terminal`)."""
    lines = []
    for hit in hits:
        text = printable(" ".join(str(hit.payload.get("text", "")).split()), limit=width)
        count = hit.payload.get("chunk_count", 1)
        where = f" [chunk {int(hit.payload.get('chunk_index', 0)) + 1}/{count}]" if isinstance(count, int) and count > 1 else ""
        lines.append(f"{hit.score:.4f}  {printable(str(hit.payload.get('id', hit.id)))}{where}  {text}")
    return lines
