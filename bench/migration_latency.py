"""Time from losing a group member to each moved stream's first resumed token (request migration), on CPU.

Two decode groups of 2 tiny-model worker processes (a0, a1 and b0, b1) behind a router in this process (dcp policy,
long prompts at CP degree 2, the router's default heartbeat). Each round streams 8 requests (greedy and seeded,
short and long) once undisturbed, the baseline, and once more; when every stream has its first token, the instance
that holds a shard of the first long request but is not its home is SIGKILLed ("killed") or SIGSTOPped ("stalled":
the group fails after --collective-timeout). For each stream homed on its group, the figure is the time from the
signal to its first token from the other group (a long one prefills its prompt and tokens so far there again). The
failed group is restarted between rounds. The baseline in the same run: each stream's time to first token and its
median time between tokens, undisturbed; the moved streams' own time to first token is what their first resumed
token compares with, as a moved stream prefills its prompt and tokens so far again. Writes
bench/results/migration_latency.json (or --out).

    .venv/bin/python bench/migration_latency.py [--rounds 4] [--stall-rounds 2] [--collective-timeout 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nanocp.client import AsyncClient
from nanocp.harness.cp_streams import REQUESTS, SPLIT_PAYS, Stream, stream_requests
from nanocp.local_cluster import free_ports
from nanocp.router.policies import make_policy
from nanocp.router.server import serve_router
from nanocp.v1 import router_pb2

RESULTS = Path(__file__).parent / "results" / "migration_latency.json"
NEW = 64


@dataclass
class Group:
    name: str
    ports: list[int]
    collective_timeout: float
    logs: Path
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self) -> None:
        rendezvous = str(free_ports(1)[0])
        self.processes = []
        for rank, port in enumerate(self.ports):
            command = [sys.executable, "-m", "nanocp", "--log-level", "WARNING", "worker", "--port", str(port)]
            command += ["--instance-id", f"{self.name}{rank}", "--threads", "1", "--num-pages", "512"]
            command += ["--rank", str(rank), "--world-size", str(len(self.ports)), "--master-port", rendezvous]
            command += ["--collective-timeout", str(self.collective_timeout)]
            with open(self.logs / f"{self.name}{rank}.log", "ab") as log:
                self.processes.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT))

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                os.kill(process.pid, signal.SIGCONT)
                process.kill()
            process.wait()


async def wait_ready(client: AsyncClient, count: int, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        instances = (await client.list_instances()).instances
        if sum(i.state == router_pb2.INSTANCE_STATE_READY for i in instances) == count:
            return
        await asyncio.sleep(0.2)
    raise TimeoutError(f"{count} workers were not ready within {timeout:.0f} s")


async def round_of(client: AsyncClient, groups: dict[str, Group], how: str) -> dict[str, Any]:
    """One undisturbed run and one with a member lost; the moved streams' resume times and the baseline's latencies;
    restarts the failed group."""
    undisturbed = await stream_requests(client, NEW)
    lost_at, victim = 0.0, ""

    async def lose_a_holder(streams: dict[str, Stream]) -> None:
        nonlocal lost_at, victim
        victim = streams["greedy-long-0"].holder_not_home()
        lost_at = time.monotonic()
        groups[victim[0]].processes[int(victim[1:])].send_signal(signal.SIGKILL if how == "killed" else signal.SIGSTOP)

    disturbed = await stream_requests(client, NEW, lose_a_holder)
    groups[victim[0]].stop()
    groups[victim[0]].start()
    wrong = [name for name, s in disturbed.items() if s.tokens != undisturbed[name].tokens]
    if wrong:
        raise AssertionError(f"streams {wrong} differ from the undisturbed run")
    moved = {name: s.moved_at() for name, s in disturbed.items() if s.homes[0].startswith(victim[0])}
    return {
        "lost": victim,
        "resume_s": {name: round(t - lost_at, 4) for name, t in moved.items() if t is not None},
        "not_moved": [name for name, t in moved.items() if t is None],  # finished before the loss
        "baseline_ttft_s": {name: round(s.arrived[0] - s.started, 4) for name, s in undisturbed.items()},
        "baseline_inter_token_s": [
            statistics.median(later - earlier for earlier, later in zip(s.arrived, s.arrived[1:], strict=False))
            for s in undisturbed.values()
        ],
    }


def summary(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    resumes = [t for r in rounds for t in r["resume_s"].values()]
    ttft = [t for r in rounds for t in r["baseline_ttft_s"].values()]
    ttft_moved = [r["baseline_ttft_s"][name] for r in rounds for name in r["resume_s"]]
    gaps = [t for r in rounds for t in r["baseline_inter_token_s"]]
    return {
        "streams_moved": len(resumes),
        "resume_s_median": round(statistics.median(resumes), 3),
        "resume_s_max": round(max(resumes), 3),
        "baseline_ttft_s_median": round(statistics.median(ttft), 3),
        "baseline_ttft_s_median_of_moved": round(statistics.median(ttft_moved), 3),
        "baseline_inter_token_s_median": round(statistics.median(gaps), 4),
        "rounds": rounds,
    }


async def main(args: argparse.Namespace) -> dict[str, Any]:
    logs = Path(tempfile.mkdtemp(prefix="nanocp-migration-"))
    ports = free_ports(4)
    groups = {name: Group(name, ports[i : i + 2], args.collective_timeout, logs) for name, i in (("a", 0), ("b", 2))}
    for group in groups.values():
        group.start()
    # dcp splits the long prompts over both members (what the run measures).
    policy = make_policy("dcp", shard_tokens=128, max_degree=2, cost=SPLIT_PAYS)
    router = await serve_router("tiny", [f"127.0.0.1:{p}" for p in ports], "127.0.0.1", 0, policy)
    client = AsyncClient(f"127.0.0.1:{router.port}", max_retries=0)
    results: dict[str, list[dict[str, Any]]] = {"killed": [], "stalled": []}
    try:
        for how, count in (("killed", args.rounds), ("stalled", args.stall_rounds)):
            for i in range(count):
                await wait_ready(client, 4)
                results[how].append(await round_of(client, groups, how))
                print(f"{how} round {i + 1}: {results[how][-1]['resume_s']}", flush=True)
    finally:
        await client.close()
        await router.stop()
        for group in groups.values():
            group.stop()
    return {
        "setup": {
            "groups": "2 groups of 2 tiny-model CPU worker processes (--threads 1), dcp shard_tokens 128 max_degree 2",
            "requests": f"{len(REQUESTS)} streams of {NEW} tokens (greedy and seeded, prompts of 3 and 250 tokens)",
            "router_heartbeat_s": 1.0,
            "collective_timeout_s": args.collective_timeout,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared), load {os.getloadavg()[0]:.1f}",
        },
        **{how: summary(rounds) for how, rounds in results.items() if rounds},
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4, help="rounds with a SIGKILL (default 4)")
    parser.add_argument("--stall-rounds", type=int, default=2, help="rounds with a SIGSTOP (default 2)")
    parser.add_argument("--collective-timeout", type=float, default=5.0, help="the workers' (default 5 s)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    arguments = parser.parse_args()
    result = asyncio.run(main(arguments))
    arguments.out.write_text(json.dumps(result, indent=2) + "\n")
    for how in ("killed", "stalled"):
        if how in result:
            print(how, {k: v for k, v in result[how].items() if k != "rounds"})
