"""Sparse (BM25) vectors beside the dense one, for keyword and hybrid search.

Owns: the one BM25 model every engine uses (qdrant-edge's `Bm25`, default config: k 1.2,
b 0.75, avg_len 256, English word tokenizer, lowercase, English stopwords and stemmer),
the name of the sparse vector in a collection, the RRF constant, and the engine-neutral
`SparseVector`. Must not: know an engine's API (the sinks turn `SparseVector` into theirs).

Why one tokenizer on the client for every engine: qdrant-edge has no server-side inference,
and a Qdrant server's `qdrant/bm25` inference is not in qdrant-client's local mode, so the
token ids would differ by store. Computing them here with qdrant-edge's `Bm25` gives the
same ids whether the points land in qdrant-edge, qdrant-client's local mode or a server.
Document weights are term frequencies only (`embed_document`); the IDF part of BM25 is the
engine's, through `Modifier.IDF` on the collection's sparse vector (qdrant-edge, a server,
and qdrant-client >= 1.20's local mode all apply it), so IDF stays right as the collection
grows and shrinks without re-weighting stored points. A query weighs each distinct token 1.0
(`embed_query`); the engine multiplies it by the token's IDF.

Cost (qdrant-edge-py 0.9.0, 2-core CPU): ~30,000 demo-corpus texts/s, holding the GIL; the
sinks call it on their own thread, a batch at a time (~8 ms for 256 chunks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

SPARSE_OFF = "off"
SPARSE_BM25 = "bm25"
SPARSE_MODES = (SPARSE_OFF, SPARSE_BM25)

SPARSE_VECTOR = "bm25"
"""The sparse vector's name in a collection (the dense vector stays the unnamed default one)."""

RRF_K = 60
"""Reciprocal rank fusion constant (Cormack et al. 2009): score = sum of 1 / (RRF_K + rank), rank from 0.
Passed to every engine explicitly: qdrant-client's plain `FusionQuery(RRF)` would use k = 2."""

INSTALL_HINT = "pip install 'embedworker[sparse]' (or 'embedworker[local]')"


@dataclass(frozen=True, slots=True)
class SparseVector:
    indices: tuple[int, ...]
    values: tuple[float, ...]

    def __len__(self) -> int:
        return len(self.indices)


def sparse_from(vector: Any) -> SparseVector:
    """Any engine's sparse vector (an object with `indices` and `values`) as ours."""
    return SparseVector(tuple(int(i) for i in vector.indices), tuple(float(v) for v in vector.values))


class Bm25Encoder:
    """qdrant-edge's BM25 tokenizer and weights; raises `SinkConfigError` when qdrant-edge is missing."""

    def __init__(self) -> None:
        try:
            import qdrant_edge as qe
        except ImportError:
            from processors.errors import SinkConfigError

            raise SinkConfigError(
                f"EMBEDWORKER_SPARSE=bm25 needs qdrant-edge's BM25 tokenizer, which is not installed: {INSTALL_HINT}"
            ) from None
        self._model = qe.Bm25(qe.Bm25Config())

    def documents(self, texts: Sequence[str]) -> list[SparseVector]:
        """One term-frequency vector per text (empty for a text of stopwords only)."""
        return [sparse_from(self._model.embed_document(text)) for text in texts]

    def query(self, text: str) -> SparseVector:
        return sparse_from(self._model.embed_query(text))


def bm25_encoder(mode: str) -> Bm25Encoder | None:
    """The encoder for `EMBEDWORKER_SPARSE` (None when off); a bad mode is a ValueError."""
    if mode not in SPARSE_MODES:
        raise ValueError(f"sparse must be one of {', '.join(SPARSE_MODES)}, not {mode!r}")
    return Bm25Encoder() if mode == SPARSE_BM25 else None


def missing_sparse_message(collection: str) -> str:
    """The start-up error for a dense-only collection opened with sparse vectors on."""
    return (
        f"collection {collection!r} has no {SPARSE_VECTOR!r} sparse vector (it was created with EMBEDWORKER_SPARSE=off, "
        f"so its points carry none): re-embed it into a new collection with "
        f"`EMBEDWORKER_SPARSE=bm25 embedworker reembed --model MODEL --from-collection {collection} "
        f"--target-collection NEW` (or from the input topic: --from-topic), or set EMBEDWORKER_SPARSE=off"
    )
