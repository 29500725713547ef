"""Spans leave real router and worker processes over OTLP/gRPC and reach a collector on loopback (a small receiver
the test runs): the caller's trace context crosses into the router and on to the home worker, and the group's step
traces name a straggler and link to the request."""

from __future__ import annotations

import io
import time
from collections.abc import Callable

from opentelemetry.sdk.trace import TracerProvider
from rich.console import Console

from nanocp.client import Client
from nanocp.local_cluster import local_cluster
from nanocp.step_traces import step_traces
from nanocp.trace_receiver import ReceivedSpan, TraceReceiver


def wait_for(receiver: TraceReceiver, done: Callable[[list[ReceivedSpan]], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not done(receiver.spans()):
        assert time.monotonic() < deadline, f"spans received: {sorted({s.name for s in receiver.spans()})}"
        time.sleep(0.05)


def test_spans_reach_an_otlp_collector_with_the_context_crossing_router_and_worker_processes() -> None:
    receiver = TraceReceiver.start()
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "50"}
    router_args = ["--policy", "uniform", "--cp-degree", "2"]  # every request takes two shards
    caller = TracerProvider().get_tracer("test")
    console = Console(file=io.StringIO())
    try:
        with (
            local_cluster("tiny", 2, router_args, console, ("--step-spans-every", "1"), env) as cluster,
            Client(cluster.router) as client,
        ):
            with caller.start_as_current_span("caller") as span:
                prompt = list(range(1, 101))
                chunks = list(client.generate(prompt, max_tokens=6, temperature=0.0, ignore_eos=True))
            assert chunks[-1].finish_reason == "length"
            caller_context = span.get_span_context()
            wait_for(
                receiver, lambda spans: len(step_traces(spans)) >= 3 and any(s.name.endswith("/Submit") for s in spans)
            )
    finally:
        receiver.stop()

    spans = receiver.spans()
    (router,) = [s for s in spans if s.name == "text_completion tiny"]
    (home,) = [s for s in spans if s.name == "nanocp.internal.v1.WorkerService/Submit"]
    assert (router.service, home.service) == ("nanocp-router", "nanocp-worker")
    assert router.trace_id == home.trace_id == format(caller_context.trace_id, "032x")
    assert router.parent_id == format(caller_context.span_id, "016x")
    assert home.parent_id == router.span_id
    assert home.attributes["nanocp.cp_degree"] == router.attributes["nanocp.cp_degree"] == 2
    assert home.attributes["nanocp.shards"] == router.attributes["nanocp.shards"]
    assert home.attributes["gen_ai.usage.input_tokens"] == 100 and home.attributes["gen_ai.usage.output_tokens"] == 6
    assert "first_token" in home.events and "first_token" in router.events

    traces = step_traces(spans)
    request_id = home.attributes["gen_ai.response.id"]
    assert all(t.slowest in ("w0", "w1") and t.cause in ("attention", "moe", "host", "routing") for t in traces)
    assert any(request_id in t.slowed for t in traces), "the request's steps link to its span"
    members = [s for s in spans if s.name == "instance_step tiny" and s.trace_id == traces[0].trace_id]
    assert sorted(s.attributes["nanocp.instance"] for s in members) == ["w0", "w1"]
