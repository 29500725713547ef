"""Step spans of a group: members sample the same steps and hang their instance spans under rank 0's group span,
which names the straggler; each instance span links to its requests. With tracing off nothing watches the steps."""

from __future__ import annotations

from types import SimpleNamespace
from typing import cast

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import SpanContext, TraceFlags

from nanocp.telemetry import AgreedIds
from nanocp.worker.engine import Engine, EngineConfig
from nanocp.worker.observe import watch_steps
from nanocp.worker.request import Request
from nanocp.worker.scheduler import Chunk
from nanocp.worker.step_trace import GroupMember, StepTracer
from nanocp.worker.timing import StepRecord, Straggler


def provider_into(exporter: InMemorySpanExporter, ratio: float = 1.0) -> TracerProvider:
    provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(ratio)), id_generator=AgreedIds())
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider


def members(provider: TracerProvider, size: int, every: int, requests: dict[str, SpanContext]) -> list[StepTracer]:
    return [
        StepTracer(
            provider.get_tracer("t"), provider.sampler, GroupMember("run-1", r, size, f"w{r}"), "m", every, requests
        )
        for r in range(size)
    ]


def chunks(*request_ids: str) -> list[Chunk]:
    return [Chunk(cast(Request, SimpleNamespace(request_id=i)), 1) for i in request_ids]


def record(step: int, attention_s: float) -> StepRecord:
    return StepRecord(step, 1, 64, 0, 4, 0.002 + attention_s, {"attention": attention_s, "moe_compute": 0.001})


def named(spans: tuple[ReadableSpan, ...], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


def test_the_group_span_names_the_straggler_and_the_instance_spans_hang_beneath_it() -> None:
    exporter = InMemorySpanExporter()
    provider = provider_into(exporter)
    request = SpanContext(0xABC, 0xDEF, is_remote=False, trace_flags=TraceFlags(TraceFlags.SAMPLED))
    group = members(provider, 2, 1, {"slowed": request})
    steps = [record(3, 0.001), record(3, 0.009)]  # rank 1 spends 8 ms more in attention
    for tracer, step, work in zip(group, steps, (chunks("other"), chunks("slowed", "slowed")), strict=True):
        tracer.step(step, work)
    assert not exporter.get_finished_spans(), "nothing before the verdict"
    verdict = Straggler(1, 1.8, "attention")
    for tracer, step in zip(group, steps, strict=True):
        tracer.verdict(step, verdict)

    spans = exporter.get_finished_spans()
    (root,) = named(spans, "group_step m")
    assert root.parent is None
    assert {k: root.attributes[k] for k in root.attributes or {}} == {  # type: ignore[index]
        "gen_ai.request.model": "m",
        "nanocp.step": 3,
        "nanocp.group.size": 2,
        "nanocp.straggler.rank": 1,
        "nanocp.straggler.cause": "attention",
        "nanocp.straggler.ratio": 1.8,
    }
    instances = {s.attributes["nanocp.rank"]: s for s in named(spans, "instance_step m")}  # type: ignore[index]
    assert set(instances) == {0, 1}
    for rank, span in instances.items():
        assert span.parent is not None and span.parent.span_id == root.context.span_id
        assert span.context.trace_id == root.context.trace_id
        assert span.attributes["nanocp.slowest"] == (rank == 1)  # type: ignore[index]
    assert instances[1].attributes["nanocp.step.attention_ms"] == 9.0  # type: ignore[index]
    assert [link.context.span_id for link in instances[1].links] == [0xDEF], "linked once, to the request it ran"
    assert not instances[0].links, "a request without a recorded span is not linked"
    assert group[0].trace_id(3) == group[1].trace_id(3) == format(root.context.trace_id, "032x")


def test_members_sample_the_same_steps_so_no_instance_span_is_left_without_its_group_span() -> None:
    exporter = InMemorySpanExporter()
    group = members(provider_into(exporter, ratio=0.5), 2, 3, {})
    for step in range(1, 301):
        for tracer in group:
            tracer.step(record(step, 0.001), [])
        for tracer in group:
            tracer.verdict(record(step, 0.001), Straggler(0, 1.0, "host"))
    spans = exporter.get_finished_spans()
    roots = {s.context.trace_id: s.attributes["nanocp.step"] for s in named(spans, "group_step m")}  # type: ignore[index]
    children = [s.context.trace_id for s in named(spans, "instance_step m")]
    assert sorted(children) == sorted([*roots, *roots]), "two instance spans under every group span, none orphaned"
    assert all(step % 3 == 0 for step in roots.values())
    assert 25 <= len(roots) <= 75, "about half of the 100 candidate steps"


def test_with_tracing_off_no_observer_watches_the_steps() -> None:
    engine = Engine.from_spec("tiny", EngineConfig(num_pages=16))
    for off in (trace.NoOpTracerProvider(), trace.ProxyTracerProvider()):
        assert watch_steps(engine, "w0", metrics=False, tracer_provider=off, spans_every=1, request_spans={}) is None
        assert engine.observer is None


def test_a_provider_without_agreed_ids_gets_no_step_spans(caplog: pytest.LogCaptureFixture) -> None:
    engine = Engine.from_spec("tiny", EngineConfig(num_pages=16))
    watch_steps(engine, "w0", metrics=False, tracer_provider=TracerProvider(), spans_every=1, request_spans={})
    assert engine.observer is None
    assert "AgreedIds" in caplog.text
