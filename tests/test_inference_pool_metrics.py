"""The Gateway API Inference Extension's model-server metrics, under vLLM's names: the router's (its queue, placed
requests and granted KV, on the HTTP port's /metrics) and each worker's own (on its metrics port)."""

from __future__ import annotations

import asyncio

import grpc
import httpx
from conftest import HOST, StartCluster, wait_until
from prometheus_client.parser import text_string_to_metric_families

from nanocp.internal.v1 import worker_pb2, worker_pb2_grpc
from nanocp.worker.engine import EngineConfig
from nanocp.worker.server import serve_worker

BIG = {"max_tokens": 990, "ignore_eos": True}  # 63 of the worker's 64 pages, for seconds
POOL = ("vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc")


def pool_gauges(text: str) -> dict[str, float]:
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name in POOL
    }


async def test_router_reports_its_queue_running_requests_and_granted_kv(start_cluster: StartCluster) -> None:
    cluster = await start_cluster(http=True, queue_size=1)
    async with httpx.AsyncClient(base_url=cluster.http_url) as http:

        async def gauges() -> dict[str, float]:
            return pool_gauges((await http.get("/metrics")).text)

        assert await gauges() == dict.fromkeys(POOL, 0.0)
        big = cluster.client.generate(list(range(10)), **BIG)  # type: ignore[arg-type]
        await anext(big)
        waiting = asyncio.create_task(anext(cluster.client.generate([1], max_tokens=20)))

        async def one_queued() -> bool:
            return (await gauges())["vllm:num_requests_waiting"] == 1

        await wait_until(one_queued, "the second request to queue")
        assert await gauges() == {
            "vllm:num_requests_waiting": 1,
            "vllm:num_requests_running": 1,
            "vllm:kv_cache_usage_perc": 63 / 64,
        }
        big.cancel()
        await waiting
        await cluster.wait_all_pages_free()
        assert await gauges() == dict.fromkeys(POOL, 0.0)
        assert (
            'vllm:cache_config_info{block_size="16",model_name="tiny",num_gpu_blocks="64"} 1.0'
            in (await http.get("/metrics")).text
        )


async def test_worker_reports_its_own_running_requests_and_kv_in_use() -> None:
    config = EngineConfig(page_size=16, num_pages=64, max_step_tokens=64, max_running=8)
    worker = await serve_worker("tiny", config, HOST, 0, "w0", metrics_port=0)
    try:
        async with (
            grpc.aio.insecure_channel(f"{HOST}:{worker.port}") as channel,
            httpx.AsyncClient(base_url=f"http://{HOST}:{worker.metrics_port}") as http,
        ):
            submit = worker_pb2.SubmitRequest(request_id="m", prompt_token_ids=list(range(10)))
            submit.sampling.max_tokens, submit.sampling.ignore_eos = 990, True  # seconds of decoding
            call = worker_pb2_grpc.WorkerServiceStub(channel).Submit(submit)
            await anext(aiter(call))
            live = pool_gauges((await http.get("/metrics")).text)
            call.cancel()
        assert live["vllm:num_requests_running"] == 1 and live["vllm:num_requests_waiting"] == 0
        assert 0 < live["vllm:kv_cache_usage_perc"] < 1
    finally:
        await worker.stop()
