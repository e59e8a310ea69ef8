"""`embedworker search`: the nearest documents to a query (best chunk per document)."""

from __future__ import annotations

import asyncio
from typing import Any, Sequence

from streams.config import Settings
from streams.commands.common import UserError, _load_embedder, _open_sink, _vector_size




async def search(settings: Settings, query: str, *, limit: int = 5, embedder: Any = None) -> list[Any]:
    """The `limit` nearest points of the configured collection to `query`."""
    if not query.strip():
        raise UserError("the query is empty")
    sink = _open_sink(settings)
    try:
        size = await _vector_size(sink)
        if size is None:
            raise UserError(f"collection {sink.collection!r} does not exist in {sink.location}")
        loop = asyncio.get_running_loop()
        if embedder is None:
            embedder = await loop.run_in_executor(None, _load_embedder, settings.model, settings.device)
        if size != embedder.dim:
            raise UserError(
                f"collection {sink.collection!r} has vectors of size {size}, model {settings.model!r} gives {embedder.dim}; "
                "search with the model that filled it (--model)"
            )
        vector = (await loop.run_in_executor(None, embedder.embed, [query])).vectors[0]
        # Best chunk per document: ask for more chunks than documents wanted, keep each id's first.
        hits = await sink.search(vector, limit=limit * 4)
        best: dict[str, Any] = {}
        for hit in hits:
            best.setdefault(str(hit.payload.get("id", hit.id)), hit)
        return list(best.values())[:limit]
    finally:
        await sink.close()


def format_hits(hits: Sequence[Any], *, width: int = 80) -> list[str]:
    lines = []
    for hit in hits:
        text = " ".join(str(hit.payload.get("text", "")).split())
        if len(text) > width:
            text = text[: width - 3] + "..."
        count = hit.payload.get("chunk_count", 1)
        where = f" [chunk {int(hit.payload.get('chunk_index', 0)) + 1}/{count}]" if isinstance(count, int) and count > 1 else ""
        lines.append(f"{hit.score:.4f}  {hit.payload.get('id', hit.id)}{where}  {text}")
    return lines

