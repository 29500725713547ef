"""Tracing: one Generate makes a router span and a home worker child span in one trace, with the GenAI attributes and
the placement; sampled step spans link to the requests they ran; tracing is configured from OTEL_* variables (sampler
included) and stays off without them."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import StartCluster
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from nanocp import telemetry
from nanocp.client import DeadlineExceeded

ENDPOINTS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def provider(exporter: InMemorySpanExporter) -> TracerProvider:
    provider = TracerProvider(id_generator=telemetry.AgreedIds())  # as configure_tracing builds it
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider


def by_name(spans: tuple[ReadableSpan, ...], name: str) -> ReadableSpan:
    (span,) = [s for s in spans if s.name == name]
    return span


async def test_generate_makes_a_router_span_with_a_worker_child_in_the_callers_trace(
    start_cluster: StartCluster, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    cluster = await start_cluster(tracer_provider=provider)
    with provider.get_tracer("test").start_as_current_span("caller") as caller:
        stream = cluster.client.generate([1, 2, 3, 4], max_tokens=5, temperature=0.5, top_p=0.75, ignore_eos=True)
    chunks = [c async for c in stream]
    assert chunks[-1].finish_reason == "length"

    spans = exporter.get_finished_spans()
    router = by_name(spans, "text_completion tiny")
    worker = by_name(spans, "nanocp.internal.v1.WorkerService/Submit")
    trace_id = caller.get_span_context().trace_id
    assert router.context.trace_id == worker.context.trace_id == trace_id
    assert router.parent is not None and router.parent.span_id == caller.get_span_context().span_id
    assert worker.parent is not None and worker.parent.span_id == router.context.span_id
    assert router.kind == trace.SpanKind.SERVER

    expected: dict[str, Any] = {
        "gen_ai.operation.name": "text_completion",
        "gen_ai.request.model": "tiny",
        "gen_ai.request.max_tokens": 5,
        "gen_ai.request.temperature": 0.5,
        "gen_ai.request.top_p": 0.75,
        "gen_ai.usage.input_tokens": 4,
        "gen_ai.usage.output_tokens": 5,
        "gen_ai.response.finish_reasons": ("length",),
        "nanocp.home": "w0",
        "nanocp.cp_degree": 1,
        "nanocp.shards": ("w0",),
    }
    assert {k: router.attributes.get(k) for k in expected} == expected  # type: ignore[union-attr]
    assert [e.name for e in router.events] == ["first_token"]
    home: dict[str, Any] = {
        "gen_ai.request.model": "tiny",
        "gen_ai.response.id": router.attributes["gen_ai.response.id"],  # type: ignore[index]
        "gen_ai.usage.input_tokens": 4,
        "gen_ai.usage.output_tokens": 5,
        "nanocp.instance": "w0",
        "nanocp.home": "w0",
        "nanocp.cp_degree": 1,
        "nanocp.shards": ("w0",),
    }
    assert {k: worker.attributes.get(k) for k in home} == home  # type: ignore[union-attr]
    assert [e.name for e in worker.events] == ["first_token"]
    assert router.status.is_ok and worker.status.is_ok


async def test_sampled_step_spans_carry_the_breakdown_and_link_to_the_requests_they_ran(
    start_cluster: StartCluster, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    cluster = await start_cluster(tracer_provider=provider, step_spans_every=2)
    chunks = [c async for c in cluster.client.generate([1, 2, 3, 4], max_tokens=7, temperature=0.0, ignore_eos=True)]
    assert chunks[-1].finish_reason == "length"
    await cluster.wait_all_pages_free()
    spans = exporter.get_finished_spans()
    request = by_name(spans, "nanocp.internal.v1.WorkerService/Submit")
    steps = sorted((s for s in spans if s.name == "instance_step tiny"), key=step_number)
    # Seven steps (the prefill, then six decodes), every second one traced; a lone instance's step is its own root.
    assert [s.attributes["nanocp.step"] for s in steps] == [2, 4, 6]  # type: ignore[index]
    for step in steps:
        assert step.parent is None and step.context.trace_id != request.context.trace_id
        assert [(link.context.span_id, dict(link.attributes or {})) for link in step.links] == [
            (request.context.span_id, {"gen_ai.response.id": request.attributes["gen_ai.response.id"]})  # type: ignore[index]
        ]
        attributes = step.attributes or {}
        assert attributes["nanocp.instance"] == "w0" and attributes["nanocp.step.home_tokens"] == 1
        assert attributes["nanocp.step.attention_ms"] > 0 and attributes["nanocp.step.moe_ms"] > 0
        assert "nanocp.slowest" not in attributes, "a lone instance has no group to be slowest in"


async def test_failed_generate_marks_the_router_span_as_an_error(
    start_cluster: StartCluster, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    cluster = await start_cluster(tracer_provider=provider)
    with pytest.raises(DeadlineExceeded):
        async for _ in cluster.client.generate([1, 2], max_tokens=900, ignore_eos=True, timeout=0.3):
            pass
    await cluster.wait_all_pages_free()
    router = by_name(exporter.get_finished_spans(), "text_completion tiny")
    assert not router.status.is_ok
    # The router's call to the worker carries the client's deadline: whichever ends the stream first, the client's
    # cancellation reaching the router (CANCELLED) or that call's own deadline (DEADLINE_EXCEEDED), is the
    # deadline's doing (seen both ways on a loaded 2-core machine).
    assert router.attributes is not None and router.attributes["error.type"] in ("CANCELLED", "DEADLINE_EXCEEDED")


@pytest.mark.parametrize(
    ("env", "on"),
    [
        pytest.param({}, False, id="nothing_set_is_off"),
        pytest.param({"OTEL_TRACES_EXPORTER": "none"}, False, id="exporter_none_is_off"),
        pytest.param({"OTEL_TRACES_EXPORTER": "console"}, True, id="console_exporter"),
        pytest.param({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317"}, True, id="otlp_endpoint"),
        pytest.param({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4317"}, True, id="otlp_traces_endpoint"),
        pytest.param(
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317", "OTEL_SDK_DISABLED": "true"},
            False,
            id="sdk_disabled_wins",
        ),
    ],
)
def test_tracing_is_configured_from_otel_environment_variables(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], on: bool
) -> None:
    for name in (
        "OTEL_TRACES_EXPORTER",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_SDK_DISABLED",
        "OTEL_SERVICE_NAME",
    ):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    installed: list[trace.TracerProvider] = []
    monkeypatch.setattr(trace, "set_tracer_provider", installed.append)  # keep the process-wide provider intact
    provider = telemetry.configure_tracing("nanocp-worker")
    assert (provider is not None) == on
    assert installed == ([provider] if on else [])
    if provider is not None:
        assert provider.resource.attributes["service.name"] == "nanocp-worker"
        provider.shutdown()


def test_the_sampler_comes_from_the_standard_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0.25")
    monkeypatch.setattr(trace, "set_tracer_provider", lambda provider: None)
    provider = telemetry.configure_tracing("nanocp-worker")
    assert provider is not None
    assert provider.sampler.get_description().startswith("ParentBased{root:TraceIdRatioBased{0.25}")
    assert isinstance(provider.id_generator, telemetry.AgreedIds), "step spans need agreed ids"
    provider.shutdown()


def test_tracing_is_unset_until_an_otel_variable_says_whether_or_where(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OTEL_SDK_DISABLED", "OTEL_TRACES_EXPORTER", *ENDPOINTS):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OTEL_SERVICE_NAME", "x")  # says nothing about whether spans are sent
    assert telemetry.tracing_unset()
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert not telemetry.tracing_unset()


def test_otel_service_name_overrides_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "edge-router")
    monkeypatch.setattr(trace, "set_tracer_provider", lambda provider: None)
    provider = telemetry.configure_tracing("nanocp-router")
    assert provider is not None and provider.resource.attributes["service.name"] == "edge-router"
    provider.shutdown()


def test_an_unknown_exporter_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "zipkin")
    with pytest.raises(ValueError, match="OTEL_TRACES_EXPORTER='zipkin' is not supported"):
        telemetry.configure_tracing("nanocp-router")


def test_trace_context_round_trips_through_grpc_metadata(provider: TracerProvider) -> None:
    with provider.get_tracer("test").start_as_current_span("hop") as span:
        metadata = telemetry.inject_metadata()
    assert [key for key, _ in metadata] == ["traceparent"]
    extracted = trace.get_current_span(telemetry.extract_context(metadata)).get_span_context()
    assert (extracted.trace_id, extracted.span_id) == (
        span.get_span_context().trace_id,
        span.get_span_context().span_id,
    )


def test_metadata_without_trace_context_extracts_to_no_parent() -> None:
    context = telemetry.extract_context([("user-agent", "x"), ("bin-bin", b"\x00")])
    assert not trace.get_current_span(context).get_span_context().is_valid


def step_number(span: ReadableSpan) -> int:
    return int((span.attributes or {})["nanocp.step"])  # type: ignore[arg-type]
