"""Graceful shutdown: on SIGTERM a router or a worker takes no new call, reports NOT_SERVING, lets its live streams
finish within the grace period and exits 0; the router places nothing on a draining worker's group meanwhile."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import grpc
import pytest
from conftest import HEARTBEAT_S, HOST, ProcessGroup, all_ready, wait_until
from grpc_health.v1 import health_pb2, health_pb2_grpc
from kubernetes import client
from test_k8s_discovery import LABELS, NAMESPACE, SELECTOR, pod, pods_api, readiness

from nanocp.client import AsyncClient, Unavailable
from nanocp.harness.offline_group import free_port
from nanocp.internal.v1 import worker_pb2, worker_pb2_grpc
from nanocp.router.discovery import KubernetesDiscovery
from nanocp.router.server import serve_router
from nanocp.v1 import common_pb2, router_pb2
from nanocp.worker.engine import EngineConfig
from nanocp.worker.server import WorkerServer, serve_worker

__all__ = ["pods_api"]  # the fixture, shared with the discovery tests

LONG = 1500  # new tokens: the stream runs well past the signal (the old shutdown cut streams after 2 s)
GRACE_S = 300  # generous: the stream must finish inside it on a loaded machine


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait()


def start(processes: list[subprocess.Popen[bytes]], *args: str) -> subprocess.Popen[bytes]:
    log = Path(tempfile.mkdtemp(prefix="nanocp-shutdown-")) / "log"
    command = [sys.executable, "-m", "nanocp", "--log-level", "INFO", *args, "--shutdown-grace", str(GRACE_S)]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    processes.append(process)
    return process


def worker_process(processes: list[subprocess.Popen[bytes]]) -> str:
    port = free_port()
    start(processes, "worker", "--port", str(port), "--threads", "1", "--master-port", str(free_port()))
    return f"{HOST}:{port}"


async def wait_serving(address: str) -> None:
    async def serving() -> bool:
        async with grpc.aio.insecure_channel(address) as channel:
            try:
                answer = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            except grpc.aio.AioRpcError:
                return False
            return answer.status == health_pb2.HealthCheckResponse.SERVING

    await wait_until(serving, f"{address} to serve", timeout=120)


async def exit_code(process: subprocess.Popen[bytes]) -> int:
    return await asyncio.to_thread(process.wait, GRACE_S + 60)


@pytest.mark.timeout(GRACE_S + 200)
async def test_sigterm_lets_the_routers_streams_finish_then_exits_0(
    processes: list[subprocess.Popen[bytes]],
) -> None:
    worker = worker_process(processes)
    await wait_serving(worker)
    router_port = free_port()
    router = start(processes, "router", "--workers", worker, "--port", str(router_port))
    address = f"{HOST}:{router_port}"
    await wait_serving(address)
    async with AsyncClient(address, max_retries=0) as client:
        stream = client.generate([1, 2, 3], max_tokens=LONG, ignore_eos=True)
        first = await anext(stream)
        router.send_signal(signal.SIGTERM)

        async def refuses_new_requests() -> bool:
            try:
                [_ async for _ in client.generate([1, 2], max_tokens=2)]  # before the signal landed: it is served
            except Unavailable as refused:
                return "shutting down" in refused.message
            return False

        await wait_until(refuses_new_requests, "the router to refuse new requests", timeout=60)
        assert [r.request_id for r in (await client.list_instances()).requests] == [stream.request_id]
        rest = [chunk async for chunk in stream]
    assert rest[-1].finish_reason == "length"
    assert len(first.token_ids) + sum(len(c.token_ids) for c in rest) == LONG
    assert await exit_code(router) == 0


@pytest.mark.timeout(GRACE_S + 200)
async def test_sigterm_lets_a_workers_streams_finish_then_exits_0(processes: list[subprocess.Popen[bytes]]) -> None:
    address = worker_process(processes)
    await wait_serving(address)
    worker = processes[-1]
    async with grpc.aio.insecure_channel(address) as channel:
        stub: worker_pb2_grpc.WorkerServiceAsyncStub = worker_pb2_grpc.WorkerServiceStub(channel)  # type: ignore[assignment]
        sampling = common_pb2.SamplingParams(max_tokens=LONG, ignore_eos=True)
        call = stub.Submit(worker_pb2.SubmitRequest(request_id="r", prompt_token_ids=[1, 2, 3], sampling=sampling))
        tokens = len((await call.read()).token_ids)  # type: ignore[union-attr]
        worker.send_signal(signal.SIGTERM)

        await wait_until(lambda: _draining(stub), "the worker to report draining", timeout=60)
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async for _ in stub.Submit(worker_pb2.SubmitRequest(request_id="late", prompt_token_ids=[1])):
                pass
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        finish = common_pb2.FINISH_REASON_UNSPECIFIED
        while (reply := await call.read()) is not grpc.aio.EOF:
            tokens += len(reply.token_ids)  # type: ignore[union-attr]
            finish = reply.finish_reason  # type: ignore[union-attr]
    assert (tokens, finish) == (LONG, common_pb2.FINISH_REASON_LENGTH)
    assert await exit_code(worker) == 0


@pytest.mark.timeout(GRACE_S)
async def test_a_second_signal_stops_at_once(processes: list[subprocess.Popen[bytes]]) -> None:
    address = worker_process(processes)
    await wait_serving(address)
    worker = processes[-1]
    async with grpc.aio.insecure_channel(address) as channel:
        stub: worker_pb2_grpc.WorkerServiceAsyncStub = worker_pb2_grpc.WorkerServiceStub(channel)  # type: ignore[assignment]
        sampling = common_pb2.SamplingParams(max_tokens=4000, ignore_eos=True)  # far longer than the test waits
        call = stub.Submit(worker_pb2.SubmitRequest(request_id="r", prompt_token_ids=[1, 2, 3], sampling=sampling))
        await call.read()
        worker.send_signal(signal.SIGTERM)
        await wait_until(lambda: _draining(stub), "the worker to report draining", timeout=60)
        worker.send_signal(signal.SIGINT)
        # well inside the grace period the first signal gave
        assert await asyncio.wait_for(asyncio.to_thread(worker.wait), GRACE_S / 3) == 0
        with pytest.raises(grpc.aio.AioRpcError):
            while await call.read() is not grpc.aio.EOF:
                pass


async def _draining(stub: worker_pb2_grpc.WorkerServiceAsyncStub) -> bool:
    return (await stub.GetLoad(worker_pb2.GetLoadRequest(), timeout=5)).draining


@pytest.mark.timeout(GRACE_S + 200)
async def test_sigterm_to_a_whole_group_lets_its_streams_finish_then_every_member_exits_0() -> None:
    group = ProcessGroup.start([free_port(), free_port()], lambda rank: ["--shutdown-grace", str(GRACE_S)])
    router = await serve_router("tiny", [f"{HOST}:{p}" for p in group.ports], HOST, 0, heartbeat_s=HEARTBEAT_S)
    client = AsyncClient(f"{HOST}:{router.port}", max_retries=0)
    try:
        await wait_until(lambda: all_ready(client, True), "the group to be ready", timeout=120)
        stream = client.generate([1, 2, 3], max_tokens=LONG, ignore_eos=True)
        await anext(stream)
        for member in group.processes:  # what deleting the group's pods does
            member.send_signal(signal.SIGTERM)
        assert [c async for c in stream][-1].finish_reason == "length"
        assert [await exit_code(member) for member in group.processes] == [0, 0]
    finally:
        await client.close()
        await router.stop()
        group.kill()


async def test_the_router_places_nothing_on_a_draining_worker_and_keeps_its_streams() -> None:
    config = EngineConfig(page_size=16, num_pages=256, max_step_tokens=64, max_running=8)
    worker = await serve_worker("tiny", config, HOST, 0, "w0")
    router = await serve_router("tiny", [f"{HOST}:{worker.port}"], HOST, 0, heartbeat_s=HEARTBEAT_S)
    client = AsyncClient(f"{HOST}:{router.port}", max_retries=0)
    try:
        stream = client.generate([1, 2, 3], max_tokens=LONG, ignore_eos=True)
        await anext(stream)
        shutting = asyncio.create_task(worker.shut_down(GRACE_S))

        async def unplaceable() -> bool:
            (instance,) = (await client.list_instances()).instances
            return instance.state == router_pb2.INSTANCE_STATE_UNAVAILABLE and "shutting down" in instance.problem

        await wait_until(unplaceable, "the router to see the worker draining")
        with pytest.raises(Unavailable):
            async for _ in client.generate([1, 2], max_tokens=2):
                pass
        assert [c async for c in stream][-1].finish_reason == "length"
        await asyncio.wait_for(shutting, GRACE_S)
        assert worker.drained
    finally:
        await client.close()
        await router.stop()
        await worker.stop()


@pytest.mark.timeout(90)
async def test_discovery_keeps_a_deleted_worker_pod_while_it_drains(pods_api: client.CoreV1Api) -> None:
    config = EngineConfig(page_size=16, num_pages=64, max_step_tokens=64, max_running=8)
    workers = [await serve_worker("tiny", config, HOST, 0, f"w{i}") for i in range(2)]
    discovery = KubernetesDiscovery(NAMESPACE, SELECTOR, api_client=pods_api.api_client, watch_timeout_s=1)
    router = await serve_router("tiny", [], HOST, 0, heartbeat_s=HEARTBEAT_S, discovery=discovery)
    rpc = AsyncClient(f"{HOST}:{router.port}", max_retries=0)

    def listed(ids: set[str]) -> Callable[[], Awaitable[bool]]:
        async def check() -> bool:
            return {i.id for i in (await rpc.list_instances()).instances} == ids

        return check

    async def create(name: str, worker: WorkerServer) -> None:
        await asyncio.to_thread(pods_api.create_namespaced_pod, NAMESPACE, pod(name, worker.port, ready=True))

    try:
        await create("worker-0", workers[0])
        await wait_until(listed({"w0"}), "the worker pod to be listed")
        # What a pod being deleted shows while its containers stop: a deletion timestamp, and soon not Ready (its
        # health is NOT_SERVING). The finalizer keeps the emulator from dropping it at once, as kubelet's grace does.
        metadata = {"deletionTimestamp": "2026-01-01T00:00:00Z", "finalizers": ["test/terminating"]}
        metadata |= {"labels": LABELS, "namespace": NAMESPACE}
        terminating = {"metadata": metadata, **readiness(False)}
        await asyncio.to_thread(pods_api.patch_namespaced_pod, "worker-0", NAMESPACE, terminating)
        await create("worker-1", workers[1])  # events arrive in order: once w1 is in, the deletion was seen
        await wait_until(listed({"w0", "w1"}), "the new pod to be listed beside the draining one")
    finally:
        await rpc.close()
        await router.stop()
        for worker in workers:
            await worker.stop()
