"""The real thing the simulator is checked against: a group of CPU workers and a router (nanocp.local_cluster)
replaying a workload through the SDK, with every worker's step log.

The workload is a head of the Mooncake trace (nanocp/sim/data/mooncake-head.jsonl: the first 300 requests of the
public Mooncake synthetic trace, Apache-2.0, hash ids dropped) with prompts divided to fit the tiny model's context,
as bench/policy_comparison.py replays it. Clients ask for exactly the true output length (ignore_eos), the only way
to make random weights stop where the trace says.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from nanocp.client import AsyncClient
from nanocp.local_cluster import local_cluster, step_logs
from nanocp.sim.calibration import RESULTS, Calibration, fit_cpu_steps
from nanocp.sim.cluster import Cluster, PolicySpec
from nanocp.sim.data import MOONCAKE_HEAD, calibration_path
from nanocp.sim.hardware import DEVICES
from nanocp.sim.loop import simulate
from nanocp.sim.metrics import percentile
from nanocp.sim.shapes import SHAPES
from nanocp.workload import TraceRequest, at_rate, fit_lengths, load_mooncake

PAGE_SIZE = 16  # the worker's default
MAX_STEP_TOKENS = 512  # the worker's default
MAX_RUNNING = 64  # the worker's default
ROUTES = ("cp_route", "moe_route", "exchange")  # sections of a step spent routing (and waiting for peers)
PAGES = 256  # KV pages a worker: a long request fills most of one
DCP = PolicySpec("dcp", shard_tokens=1024, max_degree=4)  # shards of 1024 tokens on the tiny model's 4096 context
# Every request split four ways: steps with CP routes for the fit and its checks (dcp splits only where its cost
# model predicts a faster step, which on CPU, where a route costs milliseconds, it never does).
CP = PolicySpec("uniform", 4)


def mooncake_head(
    count: int, rate: float, skip: int = 0, max_input: int = 3000, max_output: int = 48
) -> list[TraceRequest]:
    """`count` requests of the committed trace head from `skip` on, fitted to the tiny model, at `rate` a second."""
    trace = load_mooncake(MOONCAKE_HEAD, skip + count)[skip:]
    return at_rate(fit_lengths(trace, max_input, max_output, min_input=8), rate)


def calibration_workload() -> list[TraceRequest]:
    """What a fresh calibration replays: the first 24 requests of the head, 6 a second."""
    return mooncake_head(24, rate=6.0)


def check_workload() -> list[TraceRequest]:
    """What a check of the fit replays: the 24 requests after the calibration's."""
    return mooncake_head(24, rate=6.0, skip=24)


def cpu_cluster(calibration: Calibration, pages: int, instances: int = 4) -> Cluster:
    """The simulated twin of the embedded group: tiny model, fitted CPU coefficients and gloo link, the worker's
    defaults for pages, step token budget and running requests, prefill in the group's own steps."""
    assert calibration.link is not None, "a CPU calibration fits its link"
    return Cluster(
        SHAPES["tiny"],
        DEVICES["cpu"],
        calibration.link,
        instances,
        calibration.coefficients,
        page_size=PAGE_SIZE,
        kv_pages=pages,
        prefill="chunked",
        max_step_tokens=MAX_STEP_TOKENS,
        max_running=MAX_RUNNING,
    )


@dataclass(frozen=True)
class Latency:
    ttft_ms: float
    tpot_ms: float


@dataclass(frozen=True)
class CpuGroupRun:
    latency: list[Latency]  # per request, in workload order
    steps: list[list[dict[str, Any]]]  # per instance: its step log (home_tokens, kv_tokens_read, ..., section_ms)

    def group_steps(self) -> list[list[dict[str, Any]]]:
        """Per step that every instance logged: each instance's record, in rank order."""
        by_step = [{r["step"]: r for r in log} for log in self.steps]
        common = sorted(set.intersection(*(set(s) for s in by_step)))
        return [[s[step] for s in by_step] for step in common]

    def samples(self) -> list[list[list[float]]]:
        """What the CPU calibration fits: per group step, per instance [home tokens, KV tokens read, routed rows,
        step ms, routing ms] (routing: the CP and MoE routes and the step exchange, waits included)."""
        return [
            [
                [
                    r["home_tokens"],
                    r["kv_tokens_read"],
                    r["rows_routed"],
                    round(r["step_ms"], 3),
                    round(sum(r["section_ms"].get(name, 0.0) for name in ROUTES), 3),
                ]
                for r in group
            ]
            for group in self.group_steps()
        ]


@dataclass(frozen=True)
class Comparison:
    """The real group and the simulator on one workload and policy."""

    policy: str
    measured_step_ms: float  # mean over group steps of the slowest member's step
    simulated_step_ms: float
    measured_tpot_p50_ms: float
    simulated_tpot_p50_ms: float

    def errors(self) -> dict[str, float]:
        return {
            "step": self.simulated_step_ms / self.measured_step_ms - 1,
            "tpot_p50": self.simulated_tpot_p50_ms / self.measured_tpot_p50_ms - 1,
        }


async def replay(address: str, requests: list[TraceRequest]) -> list[Latency]:
    """Sends each request at its arrival time (same prompts every run) and times its tokens as the client sees them."""
    async with AsyncClient(address) as client:

        async def one(i: int, r: TraceRequest, start: float) -> Latency:
            await asyncio.sleep(max(0.0, start + r.arrival_s - time.perf_counter()))
            sent = time.perf_counter()
            prompt = [(i * 7919 + j) % 256 for j in range(r.input_tokens)]
            times = []
            async for chunk in client.generate(prompt, max_tokens=r.output_tokens, temperature=0.0, ignore_eos=True):
                times.extend([time.perf_counter()] * len(chunk.token_ids))
            tpot = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else 0.0
            return Latency(1000 * (times[0] - sent), 1000 * tpot)

        start = time.perf_counter()
        return list(await asyncio.gather(*(one(i, r, start) for i, r in enumerate(requests))))


def router_args(policy: PolicySpec, cost_model: Path | None = None) -> list[str]:
    """`nanocp router` flags for the policy, deciding with `cost_model` (as the simulated router does) if given."""
    args = ["--policy", policy.name, "--shard-tokens", str(policy.shard_tokens), "--max-degree", str(policy.max_degree)]
    if policy.cp_degree is not None:
        args += ["--cp-degree", str(policy.cp_degree)]
    return args if cost_model is None else [*args, "--cost-model", str(cost_model)]


def fresh_calibration(console: Console, work: Path) -> Calibration:
    """The CPU fit on fresh runs of the group (the machine as busy as it is now): the calibration workload under
    static and under uniform D = 4 (so steps with and without CP routes), with the committed calibration's cost
    model."""
    committed = cpu_cluster(Calibration.load(calibration_path("cpu")), PAGES)
    committed.step_model().router_cost().save(work / "committed_cost_model.json")
    samples = []
    for policy in (PolicySpec("static"), CP):
        run = run_cpu_group(
            calibration_workload(), router_args(policy, work / "committed_cost_model.json"), PAGES, console
        )
        samples += run.samples()
    breakdown = json.loads((RESULTS / "group_step_breakdown.json").read_text())
    return fit_cpu_steps(samples, 4, breakdown)


def compare(
    requests: list[TraceRequest], policy: PolicySpec, calibration: Calibration, pages: int, console: Console, work: Path
) -> Comparison:
    """Runs the real group and simulates its twin on the same requests under the same policy and cost model."""
    cluster = cpu_cluster(calibration, pages)
    cost = cluster.step_model().router_cost()
    cost.save(work / "cost_model.json")
    real = run_cpu_group(requests, router_args(policy, work / "cost_model.json"), pages, console)
    simulated = simulate(cluster, policy, requests, max_tokens=None).summary()
    steps = [max(r["step_ms"] for r in group) for group in real.group_steps()]
    return Comparison(
        policy.label,
        statistics.mean(steps),
        simulated["step_ms_mean"],
        percentile([x.tpot_ms for x in real.latency], 0.5),
        simulated["tpot_p50_ms"],
    )


def run_cpu_group(
    requests: list[TraceRequest], router_args: list[str], pages: int, console: Console, workers: int = 4
) -> CpuGroupRun:
    """Starts a group of tiny CPU workers (`pages` KV pages each) and a router, replays, collects the step logs."""
    worker_args = ("--num-pages", str(pages))
    with local_cluster("tiny", workers, router_args, console, worker_args=worker_args) as cluster:

        async def go() -> CpuGroupRun:
            latency = await replay(cluster.router, requests)
            logs = await step_logs(cluster.workers)
            steps = [
                [
                    {
                        "step": r.step,
                        "home_tokens": r.home_tokens,
                        "kv_tokens_read": r.kv_tokens_read,
                        "rows_routed": r.rows_routed,
                        "step_ms": r.step_ms,
                        "section_ms": dict(r.section_ms),
                    }
                    for r in log
                ]
                for log in logs
            ]
            return CpuGroupRun(latency, steps)

        return asyncio.run(go())
