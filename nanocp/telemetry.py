"""OpenTelemetry tracing for the router, the workers and the SDK.

Tracing is off unless the standard OTEL_* environment variables ask for it, so a plain `nanocp run` exports nothing
and needs no collector. Trace context crosses every gRPC hop in the call metadata through the global propagator
(W3C traceparent by default), so a client span, the router span and the worker span share one trace.

Sampling follows the standard OTEL_TRACES_SAMPLER and OTEL_TRACES_SAMPLER_ARG (the SDK reads them; the default is
parentbased_always_on), so a worker's span follows its router's decision.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from typing import TypeGuard

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.util.types import AttributeValue

from nanocp.placement import Placement

log = logging.getLogger(__name__)

Metadata = tuple[tuple[str, str], ...]

# A worker traces every so many steps of its group when tracing is on: a few steps a second while decoding, at a cost
# far below 1% of the step (bench/tracing_overhead.py).
STEP_SPANS_EVERY = 64


_ENDPOINTS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
_SWITCHES = ("OTEL_SDK_DISABLED", "OTEL_TRACES_EXPORTER", *_ENDPOINTS)


def _exporter_name() -> str | None:
    """The trace exporter the environment selects, or None when tracing stays off."""
    if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return None
    name = os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if name:
        return None if name == "none" else name
    return "otlp" if any(os.environ.get(e) for e in _ENDPOINTS) else None


def tracing_unset() -> bool:
    """True when no OTEL_* variable says whether or where traces go."""
    return not any(os.environ.get(name) for name in _SWITCHES)


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
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: service}), id_generator=AgreedIds())
    provider.add_span_processor(BatchSpanProcessor(_make_exporter(name)))
    trace.set_tracer_provider(provider)
    log.info("tracing on: %s exporter, service %s, sampler %s", name, service, provider.sampler.get_description())
    return provider


def tracing_on(provider: trace.TracerProvider) -> TypeGuard[TracerProvider]:
    """Whether spans started through `provider` may be recorded (the API's default provider records nothing)."""
    return isinstance(provider, TracerProvider)


_AGREED: ContextVar[tuple[int, int] | None] = ContextVar("nanocp_agreed_ids", default=None)


class AgreedIds(RandomIdGenerator):
    """Random ids, except for a span started inside `agreed_ids`: how one member of a decode group starts a span
    whose ids the other members computed too, so they can make it the parent of theirs without talking."""

    def generate_trace_id(self) -> int:
        agreed = _AGREED.get()
        return agreed[0] if agreed is not None else super().generate_trace_id()

    def generate_span_id(self) -> int:
        agreed = _AGREED.get()
        return agreed[1] if agreed is not None else super().generate_span_id()


@contextlib.contextmanager
def agreed_ids(trace_id: int, span_id: int) -> Iterator[None]:
    """The span started inside gets these ids, when its provider was built with AgreedIds."""
    token = _AGREED.set((trace_id, span_id))
    try:
        yield
    finally:
        _AGREED.reset(token)


def step_ids(run_id: str, step: int) -> tuple[int, int]:
    """The trace id and root span id of a group step's trace, the same on every member of the group's run."""
    digest = hashlib.blake2b(f"{run_id}/{step}".encode(), digest_size=24).digest()
    return int.from_bytes(digest[:16]) or 1, int.from_bytes(digest[16:]) or 1  # zero ids are invalid


def inject_metadata(context: Context | None = None) -> Metadata:
    """gRPC metadata carrying `context` (default: the current one) for the next hop."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context)
    return tuple(carrier.items())


def extract_context(metadata: Iterable[tuple[str, str | bytes]] | None) -> Context:
    """The trace context a caller put in its gRPC metadata (an empty context when there is none)."""
    carrier = {key: value for key, value in metadata or () if isinstance(value, str)}
    return propagate.extract(carrier)


def placement_attributes(placement: Placement) -> dict[str, AttributeValue]:
    """A request's placement as span attributes."""
    return {
        "nanocp.home": placement.home,
        "nanocp.cp_degree": placement.cp_degree,
        "nanocp.shards": [shard.instance for shard in placement.shards],  # in position order, the tail last
    }
