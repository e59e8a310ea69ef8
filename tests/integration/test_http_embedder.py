"""The http embedder: its request logic (no I/O), then against a real OpenAI-compatible server.

The server is infinity-emb serving the bundled model (`make embedding-server`, a
virtualenv of its own), or the one `EMBEDWORKER_TEST_EMBEDDINGS_URL` names. Where neither
is at hand, the server tests skip with the reason.
"""

from __future__ import annotations

import base64
import logging

import httpx
import numpy as np
import orjson
import pytest

from bench.embedding_server import available, embedding_server
from processors.errors import EmbeddingServerError
from processors.http_embedder import HttpEmbedder, estimated_offsets
from schemas import point_id
from support import event, make_settings, make_sink, produce, read_topic, running_worker, until
from support import retrieve

DIM = 4


def _server(handler):
    """A transport that answers from `handler(inputs) -> (status, body | vectors)`, counting requests."""
    calls: list[list[str]] = []

    def respond(request: httpx.Request) -> httpx.Response:
        body = orjson.loads(request.content)
        calls.append(body["input"])
        status, answer, *headers = handler(body["input"])
        if status != 200:
            return httpx.Response(status, json={"error": answer}, headers=headers[0] if headers else None)
        return httpx.Response(200, json={"data": [{"index": i, "embedding": v} for i, v in enumerate(answer)]})

    return httpx.MockTransport(respond), calls


def _vectors(inputs):
    return [[float(len(t)), 1.0, 0.0, 0.0] for t in inputs]


def _embedder(transport, **kwargs) -> HttpEmbedder:
    kwargs.setdefault("dimensions", DIM)
    kwargs.setdefault("tokenizer_model", "")
    kwargs.setdefault("probe", False)  # the logic under test, not the start-up request
    return HttpEmbedder(url="http://embed.test/v1", model="m", transport=transport, **kwargs)


def test_transient_errors_are_retried_and_retry_after_is_honoured():
    answers = iter([(503, "busy"), (429, "slow down", {"retry-after": "0"}), None])

    def handler(inputs):
        answer = next(answers)
        return answer if answer else (200, _vectors(inputs))

    transport, calls = _server(handler)
    result = _embedder(transport, retry_seconds=5).embed(["abc", "de"])
    assert len(calls) == 3
    assert result.rejected == {}
    assert np.allclose(np.linalg.norm(result.vectors, axis=1), 1.0)  # normalized here, whatever the server sends


def test_a_rejected_input_is_found_and_only_it_is_refused():
    def handler(inputs):
        return (422, "input too long") if any("poison" in t for t in inputs) else (200, _vectors(inputs))

    transport, calls = _server(handler)
    texts = [f"text {i}" for i in range(7)] + ["poison"] + [f"more {i}" for i in range(4)]
    result = _embedder(transport, max_batch=32).embed(texts)
    assert list(result.rejected) == [7]
    assert "422" in result.rejected[7] and "input too long" in result.rejected[7]
    assert result.vectors.shape == (12, DIM)
    assert all(result.vectors[i][0] > 0 for i in range(12) if i != 7)
    assert len(calls) < 12  # split in halves, not one request per input


def test_a_deployment_error_fails_the_batch_and_refuses_no_input(caplog):
    transport, calls = _server(lambda inputs: (401, "bad key"))
    embedder = _embedder(transport, api_key="s3cret-key", retry_seconds=0.5)
    with caplog.at_level(logging.DEBUG), pytest.raises(EmbeddingServerError) as failure:
        embedder.embed(["a", "b", "c"])
    assert failure.value.status == 401
    assert len(calls) == 1  # a 401 is not retried, and not split into dead letters
    shown = str(failure.value) + repr(embedder) + caplog.text
    assert "s3cret-key" not in shown


def test_the_api_key_travels_in_the_authorization_header_only():
    seen: list[httpx.Request] = []

    def respond(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"data": [{"index": 0, "embedding": [1.0, 0.0, 0.0, 0.0]}]})

    embedder = _embedder(httpx.MockTransport(respond), api_key="s3cret-key")
    embedder.embed(["a"])
    assert seen[0].headers["authorization"] == "Bearer s3cret-key"
    assert b"s3cret-key" not in seen[0].content and "s3cret-key" not in str(seen[0].url)


def test_requests_respect_the_batch_and_token_limits():
    transport, calls = _server(lambda inputs: (200, _vectors(inputs)))
    embedder = _embedder(transport, max_batch=4, batch_tokens=100)
    embedder.embed(["word " * 10] * 10)  # ~11 estimated tokens each... more with the word pieces
    assert all(len(c) <= 4 for c in calls) and sum(len(c) for c in calls) == 10
    tokens = [sum(len(estimated_offsets(t)) for t in c) for c in calls]
    assert max(tokens) <= 100


def test_estimated_offsets_cover_the_text_with_short_pieces():
    text = "Kafka streams, unbelievably fast!"
    spans = estimated_offsets(text)
    assert all(0 < b - a <= 4 for a, b in spans)
    assert "".join(text[a:b] for a, b in spans) == text.replace(" ", "")
    assert len(estimated_offsets("汉字" * 500)) == 1000  # an ideograph is about a token, not a quarter


def test_a_non_finite_vector_refuses_only_its_input():
    def handler(inputs):
        nan = base64.b64encode(np.full(DIM, np.nan, dtype="<f4").tobytes()).decode()  # JSON has no NaN; base64 does
        return 200, [nan if t == "overflow" else [1.0, 0.0, 0.0, 0.0] for t in inputs]

    transport, _ = _server(handler)
    result = _embedder(transport).embed(["fine", "overflow", "also fine"])
    assert list(result.rejected) == [1] and "non-finite" in result.rejected[1]
    assert np.isfinite(result.vectors).all()


def test_a_size_the_model_cannot_give_is_an_error_at_start():
    transport, _ = _server(lambda inputs: (200, [[1.0, 0.0, 0.0, 0.0, 0.0] for _ in inputs]))
    with pytest.raises(EmbeddingServerError, match="size 5, asked for 4"):
        _embedder(transport, probe=True)


# ---- against a real server ------------------------------------------------------------------

needs_server = pytest.mark.skipif(available() is not None, reason=available() or "")


@pytest.fixture(scope="module")
def server():
    if available() is not None:
        pytest.skip(available())
    with embedding_server(api_key="test-key-123") as running:
        yield running


def _http(server, **kwargs) -> HttpEmbedder:
    return HttpEmbedder(url=server.url, model=server.model, api_key=server.api_key, **kwargs)


@needs_server
def test_server_vectors_match_the_local_model(server, embedder):
    texts = [
        "The espresso machine works exactly as described.",
        "Rate limits apply per API key and reset at the start of every minute.",
        "Ünïcödé and emoji 🎉 survive the trip.",
        "short",
    ] + [f"sentence {i} about streaming vectors into a store" for i in range(60)]
    for encoding in ("float", "base64"):
        client = _http(server, encoding=encoding, max_batch=8)
        try:
            remote = client.embed(texts)
        finally:
            client.close()
        local = embedder.embed(texts).vectors
        cosine = (remote.vectors * local).sum(axis=1)
        assert cosine.min() >= 0.99, (encoding, float(cosine.min()))
        assert client.dim == 384 and client.max_tokens == embedder.max_tokens  # the bundled tokenizer is here


@needs_server
def test_a_wrong_key_is_a_clear_error_at_start(server):
    with pytest.raises(EmbeddingServerError) as failure:
        HttpEmbedder(url=server.url, model=server.model, api_key="wrong-key-456", retry_seconds=1)
    assert failure.value.status in (401, 403)
    assert "wrong-key-456" not in str(failure.value)


@pytest.mark.integration
@needs_server
async def test_worker_with_the_http_embedder_end_to_end(services, server, embedder):
    settings = await make_settings(
        services, partitions=2, embedder="http", embeddings_url=server.url, embeddings_api_key=server.api_key or "",
        model=server.model, embeddings_max_batch=16,
    )
    long_text = " ".join(f"Paragraph {i} tells of streams, vectors and the stores that keep them." for i in range(60))
    texts = [f"event {i}: the worker embeds this through a server" for i in range(30)] + [long_text]
    await produce(settings, [event(f"h-{i}", t) for i, t in enumerate(texts)] + [b"not json"])
    from streams.assembly import build_embedder

    client = build_embedder(settings)
    sink = make_sink(settings)
    try:
        async with running_worker(settings, client, sink=sink) as worker:
            await until(lambda: worker.stats.processed + worker.stats.dead_letters == 32, timeout=120, what="all handled")
    finally:
        client.close()
    results = [orjson.loads(r.value) for r in await read_topic(settings, settings.output_topic, expect=31)]
    assert sorted(r["id"] for r in results) == sorted(f"h-{i}" for i in range(31))
    assert next(r for r in results if r["id"] == "h-30")["chunks"] > 1  # chunked with the model's own tokenizer
    assert len(await read_topic(settings, settings.dlq_topic, expect=1)) == 1
    points = await retrieve(sink, [point_id(f"h-{i}") for i in range(30)])
    local = embedder.embed(texts[:30]).vectors
    for i in range(30):
        vector, payload = points[point_id(f"h-{i}")]
        assert payload["id"] == f"h-{i}"
        assert float(np.dot(vector, local[i])) >= 0.99


async def test_a_server_that_refuses_every_text_is_an_outage_not_dead_letters():
    """E.g. `dimensions` the model cannot give: every request is a 400, the probe text's too."""
    import asyncio

    from processors.pipeline import Pipeline
    from processors.sink import QdrantSink
    from schemas import InputEvent
    from support import unique

    transport, calls = _server(lambda inputs: (400, "dimensions not supported"))
    sink = QdrantSink(collection=unique("http"))
    pipeline = Pipeline(embedder=_embedder(transport), sink=sink, embed_retry_seconds=0.1)
    await pipeline.start()
    task = asyncio.create_task(pipeline.process([InputEvent(id=f"e{i}", text=f"text {i}") for i in range(4)]))
    try:
        await until(lambda: len(calls) >= 12, timeout=30, what="the batch held and retried")
        assert not task.done()  # held like an outage: no outcome, so nothing dead-lettered or committed
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await pipeline.close()
        await sink.close()


async def test_the_pipeline_dead_letters_exactly_the_input_the_server_refuses():
    """The refusal reaches the pipeline as that one text's error, on a real (in-memory) Qdrant engine."""
    from processors.pipeline import Pipeline
    from processors.sink import QdrantSink
    from schemas import InputEvent
    from support import unique

    transport, _ = _server(lambda inputs: (400, "bad input") if "poison" in inputs else (200, _vectors(inputs)))
    sink = QdrantSink(collection=unique("http"))
    pipeline = Pipeline(embedder=_embedder(transport), sink=sink)
    await pipeline.start()
    events = [InputEvent(id=f"e{i}", text=f"fine text {i}") for i in range(5)] + [InputEvent(id="bad", text="poison")]
    outcomes = await pipeline.process(events)
    await pipeline.close()
    assert [o.error_kind for o in outcomes] == [None] * 5 + ["embed_failed"]
    assert "400" in outcomes[-1].error_message and "bad input" in outcomes[-1].error_message
    assert await sink.count() == 5
    await sink.close()


@pytest.mark.integration
@needs_server
async def test_search_and_reembed_embed_through_the_configured_server(services, tmp_path, embedder):
    """`search` and `reembed` build their embedder where the worker does: a model only the server
    knows (no local model of that name) fills a collection and answers a query."""
    from streams.commands.reembed import reembed
    from streams.commands.search import search

    with embedding_server(served_name="served-only-minilm") as served:
        settings = await make_settings(
            services, partitions=1, embedder="http", embeddings_url=served.url, model=served.model,
            qdrant_path=str(tmp_path / "store"), qdrant_engine="edge",
        )
        texts = ["the cat sleeps on the warm windowsill", "stock markets fell sharply today", "a recipe for lemon cake"]
        await produce(settings, [event(f"s-{i}", t) for i, t in enumerate(texts)])
        report = await reembed(settings, model=served.model, target=settings.collection, from_topic=settings.input_topic)
        assert (report.embedded, report.failed) == (3, 0)
        hits = await search(settings, "a kitten napping in the sun", limit=1)
    assert hits[0].payload["id"] == "s-0"
    assert hits[0].payload["model"] == "served-only-minilm"
