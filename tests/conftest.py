"""An in-process nanocp cluster for service tests: real tiny workers and a router, on free loopback ports."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from opentelemetry.trace import TracerProvider

from nanocp.client import AsyncClient
from nanocp.harness.offline_group import free_port
from nanocp.router import DEFAULT_MAX_MIGRATIONS
from nanocp.router.server import RouterServer, serve_router
from nanocp.telemetry import STEP_SPANS_EVERY
from nanocp.v1 import router_pb2
from nanocp.worker.engine import EngineConfig
from nanocp.worker.server import WorkerServer, serve_worker

HOST = "127.0.0.1"
HEARTBEAT_S = 0.1  # fast, so tests see a worker's failure or return quickly
COLLECTIVE_TIMEOUT_S = 3.0  # how long a process group's members wait for a stalled peer


def write_model_config(path: Path, **overrides: int) -> Path:
    """A config.json of a small Qwen3-MoE model (no weights): what a router reads of a model directory."""
    config = {
        "model_type": "qwen3_moe",
        "vocab_size": 384,
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "max_position_embeddings": 4096,
    }
    (path / "config.json").write_text(json.dumps({**config, **overrides}))
    return path


async def wait_until(predicate: Callable[[], Awaitable[bool]], what: str, timeout: float = 20.0) -> None:
    """Polls until `predicate` holds; the timeout only stops a broken test from hanging."""
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


@dataclass
class Cluster:
    router: RouterServer
    workers: dict[str, WorkerServer]  # by instance id
    client: AsyncClient
    worker_config: EngineConfig
    tracer_provider: TracerProvider | None = None
    _stopped: list[WorkerServer] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"{HOST}:{self.router.port}"

    @property
    def http_url(self) -> str:
        return f"http://{HOST}:{self.router.http_port}"

    def worker_address(self, instance_id: str) -> str:
        return f"{HOST}:{self.workers[instance_id].port}"

    async def instances(self) -> dict[str, router_pb2.InstanceStatus]:
        return {i.id: i for i in (await self.client.list_instances()).instances}

    async def kill_worker(self, instance_id: str) -> None:
        worker = self.workers[instance_id]
        self._stopped.append(worker)
        await worker.stop()

    async def wait_all_pages_free(self) -> None:
        """Until every worker reports no KV pages in use and the router has no pages committed."""

        async def free() -> bool:
            statuses = (await self.client.list_instances()).instances
            return all(s.kv_pages_in_use == 0 and s.kv_pages_committed == 0 and s.home_batch == 0 for s in statuses)

        await wait_until(free, "every KV page to be freed")

    async def stop(self) -> None:
        await self.client.close()
        await self.router.stop()
        for worker in self.workers.values():
            if worker not in self._stopped:
                await worker.stop()


StartCluster = Callable[..., Awaitable[Cluster]]


@pytest.fixture
async def start_cluster() -> AsyncIterator[StartCluster]:
    """Starts clusters of tiny workers w0, w1, ... behind one router; all are stopped after the test."""
    clusters: list[Cluster] = []

    async def start(
        workers: int = 1,
        num_pages: int = 64,
        queue_size: int = 8,
        tracer_provider: TracerProvider | None = None,
        step_spans_every: int = STEP_SPANS_EVERY,
        http: bool = False,
        max_migrations: int = DEFAULT_MAX_MIGRATIONS,
    ) -> Cluster:
        """`http`: the router serves its OpenAI-compatible HTTP API too (Cluster.http_url)."""
        config = EngineConfig(page_size=16, num_pages=num_pages, max_step_tokens=64, max_running=8)
        servers = {
            f"w{i}": await serve_worker(
                "tiny", config, HOST, 0, f"w{i}", tracer_provider=tracer_provider, step_spans_every=step_spans_every
            )
            for i in range(workers)
        }
        router = await serve_router(
            "tiny",
            [f"{HOST}:{w.port}" for w in servers.values()],
            HOST,
            0,
            queue_size=queue_size,
            heartbeat_s=HEARTBEAT_S,
            tracer_provider=tracer_provider,
            http_port=0 if http else None,
            max_migrations=max_migrations,
        )
        cluster = Cluster(router, servers, AsyncClient(f"{HOST}:{router.port}"), config, tracer_provider)
        clusters.append(cluster)
        return cluster

    yield start
    for cluster in clusters:
        await cluster.stop()


@pytest.fixture
async def cluster(start_cluster: StartCluster) -> Cluster:
    """One tiny worker (64 pages of 16 tokens) behind a router."""
    return await start_cluster()


@dataclass
class ProcessGroup:
    """A decode group of `nanocp worker` processes (tiny model) on the given ports; each logs to a file."""

    ports: list[int]
    processes: list[subprocess.Popen[bytes]]

    @classmethod
    def start(
        cls,
        ports: list[int],
        worker_args: Callable[[int], list[str]] = lambda rank: [],
        collective_timeout_s: float = COLLECTIVE_TIMEOUT_S,
    ) -> ProcessGroup:
        """worker_args(rank): more flags for that rank's worker (a GPU group gives each rank its own device)."""
        rendezvous = str(free_port())
        logs = Path(tempfile.mkdtemp(prefix="nanocp-group-"))
        processes = []
        for rank, port in enumerate(ports):
            command = [sys.executable, "-m", "nanocp", "--log-level", "WARNING", "worker", "--port", str(port)]
            command += ["--instance-id", f"w{rank}", "--threads", "1", "--num-pages", "512"]
            command += ["--rank", str(rank), "--world-size", str(len(ports)), "--master-port", rendezvous]
            command += ["--collective-timeout", str(collective_timeout_s), *worker_args(rank)]
            with open(logs / f"w{rank}.log", "wb") as log:
                processes.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT))
        return cls(ports, processes)

    def kill(self) -> None:
        for p in self.processes:
            if p.poll() is None:
                p.kill()
            p.wait()


async def all_ready(client: AsyncClient, ready: bool) -> bool:
    instances = (await client.list_instances()).instances
    return bool(instances) and all((i.state == router_pb2.INSTANCE_STATE_READY) == ready for i in instances)
