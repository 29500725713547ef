"""Kubernetes discovery against an in-process API emulator (kmock) with real tiny workers behind the fake pods."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from conftest import HEARTBEAT_S, HOST, wait_until
from kmock import KubernetesEmulator, ResourceInfo
from kubernetes import client

from nanocp.cli import main
from nanocp.client import AsyncClient
from nanocp.router.discovery import KubernetesDiscovery, parse_selector, pod_address
from nanocp.router.server import serve_router
from nanocp.worker.engine import EngineConfig
from nanocp.worker.server import WorkerServer, serve_worker

NAMESPACE = "serving"
SELECTOR = "app.kubernetes.io/name=nanocp,app.kubernetes.io/component=worker"
LABELS = parse_selector(SELECTOR)


def pod(name: str, port: int, *, ready: bool, labels: dict[str, str] | None = None) -> dict[str, Any]:
    # The emulator sends watch events only for bodies that carry metadata.namespace.
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NAMESPACE, "labels": labels if labels is not None else LABELS},
        "spec": {"containers": [{"name": "worker", "ports": [{"name": "grpc", "containerPort": port}]}]},
        "status": readiness(ready)["status"],
    }


def readiness(ready: bool) -> dict[str, Any]:
    # The emulator replaces lists whole, so the patch carries the full conditions list.
    return {"status": {"podIP": HOST, "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}}


@pytest.fixture
async def workers() -> AsyncIterator[dict[str, WorkerServer]]:
    config = EngineConfig(page_size=16, num_pages=64, max_step_tokens=64, max_running=8)
    servers = {name: await serve_worker("tiny", config, HOST, 0, name) for name in ("w0", "w1")}
    yield servers
    for server in servers.values():
        await server.stop()


@pytest.fixture
def pods_api(kmock: KubernetesEmulator) -> client.CoreV1Api:
    # The emulator must know the resource before the first list.
    kmock.resources["v1/pods"] = ResourceInfo(kind="Pod", namespaced=True, verbs={"list", "watch", "get"})
    return client.CoreV1Api(client.ApiClient(client.Configuration(host=str(kmock.url).rstrip("/"))))


@pytest.mark.timeout(60)
async def test_router_follows_worker_pods_as_they_become_ready_and_go_away(
    workers: dict[str, WorkerServer], pods_api: client.CoreV1Api
) -> None:
    api = pods_api
    # kmock keeps a watch open forever and can drop an event that lands as the watch starts: short watches and
    # the re-list after each one make the test independent of that.
    discovery = KubernetesDiscovery(NAMESPACE, SELECTOR, api_client=api.api_client, watch_timeout_s=1)
    router = await serve_router("tiny", [], HOST, 0, heartbeat_s=HEARTBEAT_S, discovery=discovery)
    rpc = AsyncClient(f"{HOST}:{router.port}", max_retries=0)

    async def instances_are(ids: set[str]) -> bool:
        return {i.id for i in (await rpc.list_instances()).instances} == ids

    async def create(body: dict[str, Any]) -> None:
        await asyncio.to_thread(api.create_namespaced_pod, NAMESPACE, body)

    try:
        await create(pod("worker-0", workers["w0"].port, ready=False))
        await create(pod("stranger", workers["w1"].port, ready=True, labels={"app": "other"}))
        await create(pod("worker-1", workers["w1"].port, ready=True))
        # Events arrive in order: once worker-1 is in, the unready worker-0 and the unmatched pod were seen and skipped.
        await wait_until(lambda: instances_are({"w1"}), "the ready worker pod to be listed")

        await asyncio.to_thread(api.patch_namespaced_pod, "worker-0", NAMESPACE, readiness(True))
        await wait_until(lambda: instances_are({"w0", "w1"}), "worker-0 to be listed once Ready")

        await asyncio.to_thread(api.delete_namespaced_pod, "worker-1", NAMESPACE)
        await wait_until(lambda: instances_are({"w0"}), "the deleted pod's instance to be removed")
        # w1 still answers, yet no request lands on it: it left with its pod.
        for _ in range(4):
            async for _ in rpc.generate([1, 2, 3], max_tokens=2):
                pass

        await asyncio.to_thread(api.patch_namespaced_pod, "worker-0", NAMESPACE, readiness(False))
        await wait_until(lambda: instances_are(set()), "the pod that stopped being Ready to be removed")
    finally:
        await rpc.close()
        await router.stop()


def test_pod_address_needs_ready_ip_and_named_port() -> None:
    assert pod_address(pod("p", 7000, ready=True), "grpc") == f"{HOST}:7000"
    assert pod_address(pod("p", 7000, ready=False), "grpc") is None
    assert pod_address(pod("p", 7000, ready=True), "http") is None
    annotated = pod("p", 7000, ready=True)
    annotated["metadata"]["annotations"] = {"nanocp.io/grpc-port": "7100"}
    assert pod_address(annotated, "http") == f"{HOST}:7100"
    deleting = pod("p", 7000, ready=True)
    deleting["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    assert pod_address(deleting, "grpc") is None


def test_selector_takes_equality_terms_only() -> None:
    assert parse_selector("a=b, c=d") == {"a": "b", "c": "d"}
    with pytest.raises(ValueError, match="only equality"):
        parse_selector("a in (b)")
    with pytest.raises(ValueError, match="only equality"):
        parse_selector("a!=b")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--discover", "k8s"], "--discover k8s needs --selector"),
        ([], "give --workers host:port,... or --discover k8s"),
    ],
)
def test_router_cli_needs_workers_or_a_selector(args: list[str], message: str) -> None:
    with pytest.raises(SystemExit, match=message):
        main(["router", *args])
