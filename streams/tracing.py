"""OpenTelemetry spans: one per batch, linked to each message's trace, and its phases.

A batch serves many traces at once, so its span is not a child of any of them: it
carries a link to each message's W3C `traceparent` (the OpenTelemetry messaging
convention for batch consumers). Its children are `cache.lookup`, `embed`, `cache.fill`,
`store.write` and `publish`, timed where the pipeline does them (`PipelineHooks.phase`).

Optional: without the `otel` extra (opentelemetry-api) or with `EMBEDWORKER_TRACING=off`
every call here is a no-op costing one attribute lookup. Spans record once a tracer
provider is configured: `opentelemetry-instrument embedworker run`, or the SDK set up by
the embedding application; `embedworker run` sets up an OTLP exporter itself when
`OTEL_EXPORTER_OTLP_ENDPOINT` is set and `opentelemetry-exporter-otlp` is installed.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, ContextManager, Iterator, Sequence

log = logging.getLogger(__name__)

TRACER_NAME = "embedworker"
_NULL = contextlib.nullcontext()


class Tracing:
    """Spans for batches and phases; `enabled=False` (or no opentelemetry) makes it free."""

    def __init__(self, *, enabled: bool = True) -> None:
        self._trace: Any = None
        self._propagator: Any = None
        if not enabled:
            return
        try:
            from opentelemetry import trace
            from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
        except ImportError:
            return
        self._trace = trace
        self._propagator = TraceContextTextMapPropagator()

    @property
    def active(self) -> bool:
        """Whether spans would be recorded now (opentelemetry present and a real provider set)."""
        if self._trace is None:
            return False
        provider = self._trace.get_tracer_provider()
        return type(provider).__name__ not in ("ProxyTracerProvider", "NoOpTracerProvider")

    @contextlib.contextmanager
    def batch(self, headers_of_messages: Sequence[Sequence[tuple[str, bytes]]], **attributes: Any) -> Iterator[None]:
        """The span of one batch, current for the phases run inside it."""
        if not self.active:
            yield
            return
        trace = self._trace
        links = []
        for headers in headers_of_messages:
            # Header values come from the wire: a null or malformed one costs its link, never the batch.
            try:
                carrier = {name: value.decode("latin-1") for name, value in headers
                           if name in ("traceparent", "tracestate") and isinstance(value, bytes)}
                if "traceparent" not in carrier:
                    continue
                context = trace.get_current_span(self._propagator.extract(carrier)).get_span_context()
            except Exception:
                continue
            if context.is_valid:
                links.append(trace.Link(context))
        tracer = trace.get_tracer(TRACER_NAME)
        with tracer.start_as_current_span(
            "embedworker.batch",
            kind=trace.SpanKind.CONSUMER,
            links=links,
            attributes={"messaging.batch.message_count": len(headers_of_messages), **attributes},
        ):
            yield

    def phase(self, name: str, **attributes: Any) -> ContextManager[Any]:
        """A child span of the current batch (no-op outside one)."""
        if not self.active:
            return _NULL
        return self._trace.get_tracer(TRACER_NAME).start_as_current_span(f"embedworker.{name}", attributes=attributes)


def configure_exporter() -> bool:
    """An OTLP exporter from the standard `OTEL_*` variables, when they ask for one and it is installed."""
    if not os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") and not os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        return False
    try:
        from opentelemetry import trace
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        log.warning("OTEL_EXPORTER_OTLP_ENDPOINT is set but no exporter is installed: pip install 'embedworker[otel]' "
                    "opentelemetry-exporter-otlp-proto-http")
        return False
    if type(trace.get_tracer_provider()).__name__ != "ProxyTracerProvider":
        return False  # configured already (opentelemetry-instrument): leave it
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", "embedworker")})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    return True
