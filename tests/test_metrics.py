"""Prometheus endpoints: the router's (per-instance KV, home batch, live requests by CP degree, GenAI latency with
trace exemplars, CP degrees) and the workers' (steps, group verdicts, load)."""

from __future__ import annotations

import asyncio
import urllib.request

import grpc
from conftest import HEARTBEAT_S, HOST, Cluster, wait_until
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from nanocp.client import AsyncClient
from nanocp.internal.v1 import worker_pb2, worker_pb2_grpc
from nanocp.router.server import serve_router
from nanocp.worker.engine import EngineConfig
from nanocp.worker.metrics import StepMetrics
from nanocp.worker.server import serve_worker
from nanocp.worker.timing import StepRecord, Straggler


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=5).read().decode()
    samples = {}
    for line in text.splitlines():
        if line.startswith(("nanocp_", "gen_ai_")):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


async def test_metrics_follow_a_live_request_and_return_to_zero(cluster: Cluster) -> None:
    router = await serve_router(
        "tiny", [cluster.worker_address("w0")], HOST, 0, metrics_port=0, heartbeat_s=HEARTBEAT_S
    )
    assert router.metrics_port is not None
    client = AsyncClient(f"{HOST}:{router.port}")
    try:
        stream = client.generate([1, 2, 3], max_tokens=500, temperature=0.0, ignore_eos=True)
        await anext(stream)
        live = await asyncio.to_thread(scrape, router.metrics_port)
        labels = '{group="127.0.0.1:29500",instance="w0"}'
        assert live[f"nanocp_instance_home_batch{labels}"] == 1
        assert live[f"nanocp_instance_kv_pages_committed{labels}"] == 32  # (3 + 500 - 1) tokens in pages of 16
        assert live[f"nanocp_instance_kv_pages_total{labels}"] == 64
        assert live[f"nanocp_instance_ready{labels}"] == 1
        assert live['nanocp_requests_live{cp_degree="1"}'] == 1
        stream.cancel()

        async def drained() -> bool:
            samples = await asyncio.to_thread(scrape, router.metrics_port)  # type: ignore[arg-type]
            return samples[f"nanocp_instance_kv_pages_committed{labels}"] == 0

        await wait_until(drained, "the metrics to show the pages released")
        after = await asyncio.to_thread(scrape, router.metrics_port)
        assert "nanocp_requests_live" not in "".join(after)
        model = '{gen_ai_request_model="tiny"}'
        assert after[f"gen_ai_server_time_to_first_token_seconds_count{model}"] == 1
        assert after[f"gen_ai_server_time_to_first_token_seconds_sum{model}"] > 0
        assert after[f"gen_ai_server_time_per_output_token_seconds_count{model}"] == 0, "a cancelled stream has none"
        chunks = [c async for c in client.generate([4, 5], max_tokens=6, temperature=0.0, ignore_eos=True)]
        assert sum(len(c.token_ids) for c in chunks) == 6
        finished = await asyncio.to_thread(scrape, router.metrics_port)
        assert finished[f"gen_ai_server_time_per_output_token_seconds_count{model}"] == 1
        assert finished['gen_ai_server_time_per_output_token_seconds_bucket{gen_ai_request_model="tiny",le="2.5"}'] == 1
    finally:
        await client.close()
        await router.stop()


async def test_worker_metrics_show_steps_and_load() -> None:
    config = EngineConfig(page_size=16, num_pages=64, max_step_tokens=64, max_running=8)
    worker = await serve_worker("tiny", config, HOST, 0, "w0", metrics_port=0)
    try:
        assert worker.metrics_port is not None
        async with grpc.aio.insecure_channel(f"{HOST}:{worker.port}") as channel:
            stub = worker_pb2_grpc.WorkerServiceStub(channel)
            submit = worker_pb2.SubmitRequest(request_id="m", prompt_token_ids=[1, 2, 3])
            submit.sampling.max_tokens = 5
            submit.sampling.temperature = 0.0
            async for _ in stub.Submit(submit):
                pass
        samples = await asyncio.to_thread(scrape, worker.metrics_port)
        assert samples["nanocp_step_seconds_count"] == 5  # one prefill step, then four decodes
        assert samples["nanocp_kv_pages_total"] == 64
        assert samples["nanocp_requests_running"] == 0
    finally:
        await worker.stop()


def test_only_rank_0_reports_the_group_verdicts() -> None:
    verdict = Straggler(rank=2, ratio=1.8, cause="attention")
    for rank in (0, 1):
        metrics = StepMetrics("w", rank)
        metrics.verdict(StepRecord(5, 1, 10, 0, 1, 0.01), verdict)
        count = metrics.registry.get_sample_value(
            "nanocp_group_slowest_steps_total", {"rank": "2", "cause": "attention"}
        )
        assert count == (1.0 if rank == 0 else None)


async def test_router_latency_carries_the_requests_trace_as_exemplar_and_counts_cp_degrees(cluster: Cluster) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    router = await serve_router(
        "tiny",
        [cluster.worker_address("w0")],
        HOST,
        0,
        metrics_port=0,
        heartbeat_s=HEARTBEAT_S,
        tracer_provider=provider,
    )
    assert router.metrics_port is not None
    client = AsyncClient(f"{HOST}:{router.port}")
    try:
        chunks = [c async for c in client.generate([1, 2, 3], max_tokens=4, temperature=0.0, ignore_eos=True)]
        assert chunks[-1].finish_reason == "length"
        (span,) = [s for s in exporter.get_finished_spans() if s.name == "text_completion tiny"]
        families = await asyncio.to_thread(scrape_openmetrics, router.metrics_port)
        ttft = families["gen_ai_server_time_to_first_token_seconds"]
        exemplars = [s.exemplar for s in ttft.samples if s.exemplar is not None]
        assert [e.labels["trace_id"] for e in exemplars] == [format(span.context.trace_id, "032x")]
        degrees = {s.name: s.value for s in families["nanocp_request_cp_degree"].samples}
        assert degrees["nanocp_request_cp_degree_count"] == 1 and degrees["nanocp_request_cp_degree_sum"] == 1
    finally:
        await client.close()
        await router.stop()


def scrape_openmetrics(port: int) -> dict[str, Metric]:
    """What Prometheus reads with exemplar storage on: the OpenMetrics exposition, exemplars included."""
    request = urllib.request.Request(
        f"http://{HOST}:{port}/metrics", headers={"Accept": "application/openmetrics-text"}
    )
    text = urllib.request.urlopen(request, timeout=5).read().decode()
    return {family.name: family for family in text_string_to_metric_families(text)}
