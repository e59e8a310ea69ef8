"""Text to vectors through an OpenAI-compatible `/v1/embeddings` server.

Hugging Face TEI, Infinity, vLLM, Ollama and OpenAI itself answer the same request
(`{"model", "input": [...], "dimensions"?, "encoding_format"?}`), so one client serves
them all. `HttpEmbedder` has the shape of `SentenceTransformerEmbedder` (`processors.embedder.Embedder`):
`embed` blocks its caller (the pipeline's embed thread), and inside it the requests of
one batch run concurrently on a bounded pool.

What the server's answers mean here:
- 429, 5xx, timeouts, refused connections: the server is busy or away. Retried with
  exponential backoff and jitter (tenacity), honouring `Retry-After`, for
  `retry_seconds`; then the batch fails and the pipeline's outage logic takes over (a
  probe text decides; valid input is never dead-lettered because the server is down).
- 400, 413, 422 on a request of several inputs: one of them is bad. The request is split
  in halves until the input the server rejects alone is found; only that input gets a
  dead letter (`Embeddings.rejected`).
- any other 4xx (401, 403, 404, ...): the deployment is wrong (key, URL, model name), not
  the input: the batch fails like an outage and nothing is dead-lettered.

The API key is a secret: it travels in the `Authorization` header only and never
appears in `repr`, logs or error messages.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import random
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence
from urllib.parse import urlsplit

import httpx
import numpy as np

from processors.embedder import Embeddings, estimate_tokens, resolve_model_path
from processors.errors import EmbeddingServerError

log = logging.getLogger(__name__)

CHARS_PER_TOKEN = 4
"""Without the model's tokenizer, tokens are estimated at about 4 characters each (English WordPiece/BPE)."""

_REJECTS_INPUT = frozenset({400, 413, 422})
# CJK ideographs, kana and hangul are about one token each; other words are cut every 4 characters.
_PIECE = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]|[^\W\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]+|[^\w\s]", re.UNICODE)


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, httpx.TransportError):
        return True
    return isinstance(exc, EmbeddingServerError) and exc.status is not None and (exc.status == 429 or exc.status >= 500)


def estimated_offsets(text: str) -> list[tuple[int, int]]:
    """Token-like character spans when no tokenizer is at hand: words and punctuation, long words cut every 4 characters.

    Errs towards more tokens than a real subword tokenizer counts, so chunks cut on these
    spans fit the server's limit.
    """
    spans: list[tuple[int, int]] = []
    for match in _PIECE.finditer(text):
        start, end = match.span()
        while end - start > CHARS_PER_TOKEN:
            spans.append((start, start + CHARS_PER_TOKEN))
            start += CHARS_PER_TOKEN
        spans.append((start, end))
    return spans


def _local_tokenizer(model: str) -> tuple[Any, int] | None:
    """The model's tokenizer and token limit when its files are on this machine (the bundled model or a path)."""
    path = resolve_model_path(model) if model else ""
    if not path or not os.path.isdir(path):
        return None
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    limit = 512
    config = os.path.join(path, "sentence_bert_config.json")
    if os.path.isfile(config):
        with open(config, "rb") as handle:
            limit = int(json.load(handle).get("max_seq_length", limit))
    return tokenizer, limit


class HttpEmbedder:
    """A client of an OpenAI-compatible embeddings server.

    Keyword-only settings:
    - `url`: the API base (`http://host:8080/v1`; `/embeddings` is appended) or the full
      `.../embeddings` URL.
    - `model`: the model name the server knows; also the name results and the cache carry.
    - `api_key`: sent as `Authorization: Bearer ...` (default none).
    - `dimensions`: asked of the server (models that can shorten their vectors); default:
      whatever it returns, learnt from one probe request at start.
    - `tokenizer_model`: a local model (path or the bundled name) whose tokenizer counts
      tokens exactly for batching, truncation flags and chunking (default: `model` when
      its files are here, else tokens are estimated at 4 characters each).
    - `max_tokens`: the server model's input limit when no local tokenizer says it (512).
    - `batch_tokens`: token budget of one request (16384); `max_batch`: most inputs in one
      request (32); `max_concurrency`: requests in flight at once (4).
    - `timeout_seconds`: one request (30); `retry_seconds`: how long 429/5xx/transport
      errors are retried before the batch fails (10).
    - `encoding`: `float` (default, every server) or `base64` (less JSON to parse; OpenAI,
      TEI, Infinity).
    """

    def __init__(
        self,
        *,
        url: str,
        model: str,
        api_key: str | None = None,
        dimensions: int | None = None,
        tokenizer_model: str | None = None,
        max_tokens: int = 512,
        batch_tokens: int = 16384,
        max_batch: int = 32,
        max_concurrency: int = 4,
        timeout_seconds: float = 30.0,
        retry_seconds: float = 10.0,
        encoding: str = "float",
        transport: httpx.BaseTransport | None = None,
        probe: bool = True,
    ) -> None:
        if encoding not in ("float", "base64"):
            raise ValueError(f"encoding must be float or base64, not {encoding!r}")
        if not url:
            raise ValueError("an embeddings URL is required (EMBEDWORKER_EMBEDDINGS_URL)")
        self._endpoint = url.rstrip("/") if url.rstrip("/").endswith("/embeddings") else url.rstrip("/") + "/embeddings"
        parts = urlsplit(self._endpoint)
        self.device = f"http://{parts.hostname}:{parts.port}" if parts.port else f"http://{parts.hostname}"
        """Where the vectors come from, for logs (host only: a URL may carry credentials)."""
        self.name = model
        self.dimensions = dimensions
        self.version = f"http:{dimensions}" if dimensions else "http"
        """Part of the cache key: a server's vectors are not assumed identical to the local model's."""
        self.batch_tokens = batch_tokens
        self.max_batch = max_batch
        self.encoding = encoding
        self.retry_seconds = retry_seconds
        headers = {"content-type": "application/json"}
        if api_key:
            headers["authorization"] = f"Bearer {api_key}"
        self._client = httpx.Client(
            headers=headers,
            timeout=timeout_seconds,
            limits=httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=max_concurrency),
            transport=transport,
        )
        self._pool = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="embed-http")
        self._closed = threading.Event()

        local = _local_tokenizer(tokenizer_model if tokenizer_model is not None else model)
        if local is not None:
            self._tokenizer, self.max_tokens = local
            self.special_tokens = int(self._tokenizer.num_special_tokens_to_add(pair=False))
            self.max_tokens_per_char: float | None = 1 if "Bert" in type(self._tokenizer).__name__ else None
        else:
            self._tokenizer, self.max_tokens = None, max_tokens
            self.special_tokens = 0
            # Punctuation and CJK run at a token a character: only a text of at most
            # `max_tokens` characters surely fits without counting.
            self.max_tokens_per_char = 1
        # One request at start even when the size is given: a wrong URL, key, model name or a size
        # the model cannot give is one line now, not a batch held later.
        self.dim = 0  # unknown until the probe answers
        if probe:
            probed = self._probe_dimension()
            if dimensions and probed != dimensions:
                raise EmbeddingServerError(f"embedding server returned vectors of size {probed}, asked for {dimensions}")
            self.dim = probed
        elif dimensions:
            self.dim = dimensions
        else:
            raise ValueError("without the start-up probe the vector size must be given (dimensions)")
        log.info("embeddings from %s, model %s (dim %d, %s tokens)", self.device, model, self.dim,
                 "counted" if self._tokenizer is not None else "estimated")

    def __repr__(self) -> str:
        return f"HttpEmbedder(device={self.device!r}, model={self.name!r}, dim={getattr(self, 'dim', None)})"

    def close(self) -> None:
        self._closed.set()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._client.close()

    def _probe_dimension(self) -> int:
        vectors = self._request_with_retries(["dimension probe"])
        return int(vectors.shape[1])

    # Token accounting: exact with the local tokenizer, estimated without.

    def estimate_tokens(self, text: str) -> int:
        return min(estimate_tokens(text), self.max_tokens)

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        if self._tokenizer is None:
            return [len(estimated_offsets(t)) for t in texts]
        encoded = self._tokenizer(list(texts), add_special_tokens=True, truncation=False, verbose=False)
        return [len(ids) for ids in encoded["input_ids"]]

    def token_offsets(self, texts: Sequence[str]) -> list[list[tuple[int, int]]]:
        if self._tokenizer is None:
            return [estimated_offsets(t) for t in texts]
        encoded = self._tokenizer(
            list(texts), add_special_tokens=False, truncation=False, return_offsets_mapping=True, verbose=False
        )
        return [[(int(a), int(b)) for a, b in spans] for spans in encoded["offset_mapping"]]

    # Embedding.

    def embed(self, texts: Sequence[str], token_counts: Sequence[int] | None = None) -> Embeddings:
        """Vectors of `texts`, L2-normalized; inputs the server rejected alone are in `rejected`."""
        texts = list(texts)
        if not texts:
            return Embeddings(np.zeros((0, self.dim), dtype=np.float32), [])
        counts = list(token_counts) if token_counts is not None else self.count_tokens(texts)
        vectors = np.zeros((len(texts), self.dim), dtype=np.float32)
        rejected: dict[int, str] = {}
        requests = self._plan(counts)
        for indices, (part, errors) in zip(requests, self._pool.map(lambda ix: self._embed_request([texts[i] for i in ix]), requests)):
            vectors[indices] = part
            for position, message in errors.items():
                rejected[indices[position]] = message
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        np.divide(vectors, norms, out=vectors, where=norms > 0)
        return Embeddings(vectors, [c > self.max_tokens for c in counts], rejected)

    def _plan(self, counts: Sequence[int]) -> list[list[int]]:
        """Consecutive inputs per request, under `max_batch` inputs and `batch_tokens` tokens."""
        requests: list[list[int]] = [[]]
        tokens = 0
        for i, count in enumerate(counts):
            count = min(max(1, count), self.max_tokens)
            if requests[-1] and (len(requests[-1]) >= self.max_batch or tokens + count > self.batch_tokens):
                requests.append([])
                tokens = 0
            requests[-1].append(i)
            tokens += count
        return requests

    def _embed_request(self, texts: list[str]) -> tuple[np.ndarray, dict[int, str]]:
        """One request's vectors; a rejected request of several inputs is split until the bad input stands alone."""
        try:
            return self._request_with_retries(texts), {}
        except EmbeddingServerError as exc:
            if exc.status not in _REJECTS_INPUT:
                raise
            if len(texts) == 1:
                return np.zeros((1, self.dim), dtype=np.float32), {0: str(exc)}
        middle = len(texts) // 2
        left, left_errors = self._embed_request(texts[:middle])
        right, right_errors = self._embed_request(texts[middle:])
        errors = dict(left_errors)
        errors.update({middle + k: v for k, v in right_errors.items()})
        return np.concatenate([left, right]), errors

    def _request_with_retries(self, texts: list[str]) -> np.ndarray:
        from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_delay, wait_exponential_jitter

        backoff = wait_exponential_jitter(initial=0.1, max=5.0, jitter=0.2)

        def wait(state: RetryCallState) -> float:
            exc = state.outcome.exception() if state.outcome else None
            retry_after = getattr(exc, "retry_after", None)
            if retry_after is not None:  # the server said when: believe it, within the retry budget
                return min(retry_after, self.retry_seconds) + random.uniform(0, 0.1)
            return backoff(state)

        retrying = Retrying(
            retry=retry_if_exception(_retryable),
            wait=wait,
            stop=stop_after_delay(self.retry_seconds),
            reraise=True,
            before_sleep=lambda state: log.debug("embeddings request failed, retrying: %s", state.outcome.exception() if state.outcome else ""),
        )
        try:
            return retrying(self._request, texts)
        except httpx.TransportError as exc:
            raise EmbeddingServerError(f"embedding server unreachable at {self.device}: {type(exc).__name__}") from exc

    def _request(self, texts: list[str]) -> np.ndarray:
        if self._closed.is_set():
            raise EmbeddingServerError("embedder closed")
        body: dict[str, Any] = {"model": self.name, "input": texts}
        if self.dimensions:
            body["dimensions"] = self.dimensions
        if self.encoding == "base64":
            body["encoding_format"] = "base64"
        response = self._client.post(self._endpoint, content=json.dumps(body, ensure_ascii=False).encode())
        if response.status_code != 200:
            raise EmbeddingServerError(
                f"embedding server answered {response.status_code}: {_detail(response)}",
                status=response.status_code,
                retry_after=_retry_after(response),
            )
        return self._vectors(response, len(texts))

    def _vectors(self, response: httpx.Response, expected: int) -> np.ndarray:
        try:
            data = sorted(response.json()["data"], key=lambda item: item.get("index", 0))
            rows = [
                np.frombuffer(base64.b64decode(item["embedding"]), dtype="<f4")
                if isinstance(item["embedding"], str)
                else np.asarray(item["embedding"], dtype=np.float32)
                for item in data
            ]
            vectors = np.stack(rows).astype(np.float32, copy=False)
        except Exception as exc:
            raise EmbeddingServerError(f"embedding server sent an unreadable answer ({type(exc).__name__})") from exc
        if not np.isfinite(vectors).all():
            raise EmbeddingServerError("embedding server returned non-finite vector values", status=422)
        if vectors.shape[0] != expected:
            raise EmbeddingServerError(f"embedding server returned {vectors.shape[0]} vectors for {expected} inputs")
        dim = getattr(self, "dim", 0)
        if dim and vectors.shape[1] != dim:
            raise EmbeddingServerError(f"embedding server returned vectors of size {vectors.shape[1]}, expected {dim}")
        return vectors


def _detail(response: httpx.Response) -> str:
    """The server's own words, short (they name the problem; they never hold our key)."""
    text = response.text.strip().replace("\n", " ")
    return text[:200] or response.reason_phrase


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None
