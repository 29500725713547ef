"""OpenTelemetry tracing for the router, the workers and the SDK.

Tracing is off unless the standard OTEL_* environment variables ask for it, so a plain `nanocp run` exports nothing
and needs no collector. Trace context crosses every gRPC hop in the call metadata through the global propagator
(W3C traceparent by default), so a client span, the router span and the worker span share one trace.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

log = logging.getLogger(__name__)

Metadata = tuple[tuple[str, str], ...]


def _exporter_name() -> str | None:
    """The trace exporter the environment selects, or None when tracing stays off."""
    if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return None
    name = os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if name:
        return None if name == "none" else name
    endpoints = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    return "otlp" if any(os.environ.get(e) for e in endpoints) else None


def _make_exporter(name: str) -> SpanExporter:
    if name == "otlp":
        # Reads its endpoint, headers, TLS and timeout from the OTEL_EXPORTER_OTLP_* variables itself.
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    if name == "console":
        return ConsoleSpanExporter()
    raise ValueError(f"OTEL_TRACES_EXPORTER={name!r} is not supported; use 'otlp', 'console' or 'none'")


def configure_tracing(default_service_name: str) -> TracerProvider | None:
    """Installs a global TracerProvider when the environment turns tracing on; returns it (to shut it down) or None.

    `default_service_name` ("nanocp-router", "nanocp-worker") applies unless OTEL_SERVICE_NAME is set.
    """
    name = _exporter_name()
    if name is None:
        return None
    service = os.environ.get("OTEL_SERVICE_NAME") or default_service_name
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: service}))
    provider.add_span_processor(BatchSpanProcessor(_make_exporter(name)))
    trace.set_tracer_provider(provider)
    log.info("tracing on: %s exporter, service %s", name, service)
    return provider


def inject_metadata(context: Context | None = None) -> Metadata:
    """gRPC metadata carrying `context` (default: the current one) for the next hop."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context)
    return tuple(carrier.items())


def extract_context(metadata: Iterable[tuple[str, str | bytes]] | None) -> Context:
    """The trace context a caller put in its gRPC metadata (an empty context when there is none)."""
    carrier = {key: value for key, value in metadata or () if isinstance(value, str)}
    return propagate.extract(carrier)
