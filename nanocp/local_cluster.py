"""A decode group of workers and a router as local child processes, for `nanocp run`, the benchmarks and the
harnesses: started on free ports, waited for until the router lists every worker ready, stopped whatever happens.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
from rich.console import Console

from nanocp.client import Client, NanocpError
from nanocp.internal.v1 import worker_pb2, worker_pb2_grpc
from nanocp.v1 import router_pb2


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@dataclass(frozen=True)
class LocalCluster:
    router: str  # host:port
    workers: list[str]
    pids: dict[str, int]  # by process: "router", and each worker's instance id (w0, w1, ...)


@contextlib.contextmanager
def local_cluster(
    model: str,
    num_workers: int,
    router_args: list[str],
    console: Console,
    worker_args: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
) -> Iterator[LocalCluster]:
    """Starts a decode group of workers and a router as child processes (with `env` added to this process's
    environment); stops them all on exit."""
    *worker_ports, router_port, rendezvous_port = free_ports(num_workers + 2)
    threads = max(1, (os.cpu_count() or 1) // num_workers)
    logs = Path(tempfile.mkdtemp(prefix="nanocp-run-"))
    processes: dict[str, subprocess.Popen[bytes]] = {}

    def start(name: str, *args: str) -> None:
        # Each process logs to its own file, so the live view stays readable.
        with open(logs / f"{name}.log", "wb") as log:
            command = [sys.executable, "-m", "nanocp", *args]
            environment = {**os.environ, **(env or {})}
            processes[name] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment)

    try:
        for i, port in enumerate(worker_ports):
            group = ["--rank", str(i), "--world-size", str(num_workers), "--master-port", str(rendezvous_port)]
            args = ["--model", model, "--port", str(port), "--instance-id", f"w{i}", "--threads", str(threads)]
            start(f"w{i}", "worker", *args, *group, *worker_args)
        workers = ",".join(f"127.0.0.1:{p}" for p in worker_ports)
        start("router", "router", "--model", model, "--workers", workers, "--port", str(router_port), *router_args)
        address = f"127.0.0.1:{router_port}"
        with console.status(f"starting a group of {num_workers} worker(s) and a router on {model}"):
            _wait_serving(address, num_workers, list(processes.values()), timeout=120)
        console.print(f"router on {address}, workers on {workers}; logs in {logs}")
        yield LocalCluster(address, workers.split(","), {name: p.pid for name, p in processes.items()})
    finally:
        for process in processes.values():
            process.terminate()
        for process in processes.values():
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_serving(address: str, num_workers: int, processes: list[subprocess.Popen[bytes]], timeout: float) -> None:
    """Waits until the router lists every worker as ready (which implies it serves), or fails fast on a crash."""
    deadline = time.monotonic() + timeout
    with Client(address, max_retries=0) as client:
        while time.monotonic() < deadline:
            dead = [p.args for p in processes if p.poll() is not None]
            if dead:
                raise RuntimeError(f"a process exited during start-up: {dead[0]!r}")
            with contextlib.suppress(NanocpError):
                instances = client.list_instances(timeout=1).instances
                if sum(i.state == router_pb2.INSTANCE_STATE_READY for i in instances) == num_workers:
                    return
            time.sleep(0.2)
    raise TimeoutError(f"the router at {address} did not list {num_workers} ready worker(s) within {timeout:.0f} s")


async def step_logs(workers: list[str]) -> list[list[worker_pb2.StepRecord]]:
    """Every worker's step log (GetSteps), in the order given."""
    logs = []
    for address in workers:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = worker_pb2_grpc.WorkerServiceStub(channel)
            logs.append(list((await stub.GetSteps(worker_pb2.GetStepsRequest(after_step=0))).steps))
    return logs
