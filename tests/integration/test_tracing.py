"""OpenTelemetry spans of a real worker run: one per batch, linked to the messages' traces, with phases."""

from __future__ import annotations

import pytest

from streams.tracing import Tracing
from support import event, make_settings, produce, running_worker, until

pytestmark = pytest.mark.integration

otel_sdk = pytest.importorskip("opentelemetry.sdk.trace", reason="the otel extra is not installed")


@pytest.fixture
def spans():
    """An SDK provider with an in-memory exporter as the global one, for this test only."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.util._once import Once

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace._TRACER_PROVIDER_SET_ONCE = Once()  # as opentelemetry's own test utilities reset it
    trace._TRACER_PROVIDER = None
    trace.set_tracer_provider(provider)
    yield exporter
    provider.shutdown()
    trace._TRACER_PROVIDER_SET_ONCE = Once()
    trace._TRACER_PROVIDER = None


def test_tracing_costs_nothing_without_a_provider():
    tracing = Tracing()
    assert not tracing.active  # opentelemetry present, no provider configured: no spans are made
    with tracing.batch([[("traceparent", b"00-" + b"1" * 32 + b"-" + b"2" * 16 + b"-01")]]):
        assert tracing.phase("embed") is tracing.phase("store.write")  # the shared null context


async def test_a_batch_span_links_each_message_trace_and_holds_the_phases(services, embedder, spans):
    settings = await make_settings(services, partitions=1, batch_min_wait_ms=200, batch_max_wait_ms=400)
    trace_ids = [f"{i + 1:032x}" for i in range(6)]
    headers = [[("traceparent", f"00-{t}-{i + 1:016x}-01".encode())] for i, t in enumerate(trace_ids)]
    headers += [[("traceparent", None)], [("traceparent", b"garbage")]]  # from the wire: no link, no failure
    values = [event(f"tr-{i}", f"traced text number {i}") for i in range(8)]
    await produce(settings, values, headers=headers)
    async with running_worker(settings, embedder) as worker:
        await until(lambda: worker.stats.processed == 8, timeout=60, what="all processed")
    finished = spans.get_finished_spans()
    batches = [s for s in finished if s.name == "embedworker.batch"]
    assert batches, [s.name for s in finished]
    linked = {f"{link.context.trace_id:032x}" for b in batches for link in b.links}
    assert linked == set(trace_ids)
    assert sum(b.attributes["messaging.batch.message_count"] for b in batches) == 8
    ids = {b.context.span_id for b in batches}
    children = {s.name for s in finished if s.parent is not None and s.parent.span_id in ids}
    assert {"embedworker.cache.lookup", "embedworker.embed", "embedworker.store.write", "embedworker.publish"} <= children
