"""static, balanced (token-balanced static), dcp and uniform on one long-tailed workload: same requests, same
arrival times, same 4 CPU instances.

The workload is the head of the public Mooncake trace (../shared/traces), its prompt lengths divided to fit the tiny
model's context (the long tail kept) and its arrivals rescaled to --rate. Each policy gets a fresh group of worker
processes and a router; the client replays the trace through the SDK. Afterwards every worker's step log gives, per
step, each instance's KV tokens read, query rows routed and timed attention work, from which:
- straggler ratio: the slowest instance over the median, per step, in KV tokens read, in rows routed, and in
  measured attention time (attention + CP routes + merge);
- KV occupancy spread (max - min over instances, as a fraction of an instance's pages) and home-batch spread;
- TPOT P50 / P99 and TTFT P50 / P99 from the client, and requests that had to wait for KV memory.
It also fits the router's cost model to the measured steps (bench/results/cost_model_cpu.json, for --cost-model);
the policies of the next run use those coefficients.
Writes bench/results/policy_comparison.json and a plot beside it. Timings on 2 shared cores are noisy: compare
policies within one run.

    .venv/bin/python bench/policy_comparison.py [--requests 40] [--rate 4] [--trace PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from nanocp.client import AsyncClient
from nanocp.harness.cpu_group import Latency, replay
from nanocp.internal.v1 import worker_pb2
from nanocp.local_cluster import local_cluster, step_logs
from nanocp.router.cost import CostModel
from nanocp.workload import TraceRequest, at_rate, describe, fit_lengths, load_mooncake

RESULTS = Path(__file__).parent / "results"
COST_MODEL = RESULTS / "cost_model_cpu.json"
TRACE = Path(__file__).resolve().parents[2] / "shared" / "traces" / "mooncake-synthetic.jsonl"
PAGES = 256  # per instance: 4096 tokens, so a long request fills most of one
ATTENTION = ("attention", "cp_route", "merge")


@dataclass
class PolicyRun:
    outcomes: list[Latency] = field(default_factory=list)
    steps: list[list[worker_pb2.StepRecord]] = field(default_factory=list)  # per instance
    waited: int = 0


def run_policy(policy: str, requests: list[TraceRequest], console: Console) -> PolicyRun:
    router_args = ["--policy", policy, "--shard-tokens", "1024", "--max-degree", "4", "--cp-degree", "4"]
    if COST_MODEL.exists():  # the coefficients an earlier run fitted on this machine class
        router_args += ["--cost-model", str(COST_MODEL)]
    with local_cluster("tiny", 4, router_args, console, worker_args=("--num-pages", str(PAGES))) as cluster:

        async def go() -> PolicyRun:
            outcomes = await replay(cluster.router, requests)
            async with AsyncClient(cluster.router) as client:
                waited = (await client.list_instances()).waited_total
            return PolicyRun(list(outcomes), await step_logs(cluster.workers), waited)

        return asyncio.run(go())


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def ratio_over_median(values: list[float]) -> float | None:
    median = statistics.median(values)
    return max(values) / median if median > 0 else None


def summarise(run: PolicyRun) -> dict[str, float | None]:
    by_step = [{r.step: r for r in log} for log in run.steps]
    common = sorted(set.intersection(*(set(s) for s in by_step)))
    kv, rows, work, kv_spread, batch_spread = [], [], [], [], []
    for step in common:
        records = [s[step] for s in by_step]
        kv.append(ratio_over_median([r.kv_tokens_read for r in records]))
        rows.append(ratio_over_median([r.rows_routed for r in records]))
        work.append(ratio_over_median([sum(r.section_ms.get(n, 0.0) for n in ATTENTION) for r in records]))
        pages = [r.kv_pages_in_use for r in records]
        kv_spread.append((max(pages) - min(pages)) / PAGES)
        homes = [r.home_tokens for r in records]
        batch_spread.append(max(homes) - min(homes))

    def mean(values: list[float | None]) -> float | None:
        known = [v for v in values if v is not None]
        return statistics.mean(known) if known else None

    tpot = [o.tpot_ms for o in run.outcomes]
    ttft = [o.ttft_ms for o in run.outcomes]
    return {
        "steps": len(common),
        "straggler_kv_tokens": mean(kv),
        "straggler_rows_routed": mean(rows),
        "straggler_attention_time": mean(work),
        "kv_occupancy_spread_mean": statistics.mean(kv_spread),
        "kv_occupancy_spread_max": max(kv_spread),
        "home_batch_spread_mean": statistics.mean(batch_spread),
        "tpot_p50_ms": percentile(tpot, 0.5),
        "tpot_p99_ms": percentile(tpot, 0.99),
        "ttft_p50_ms": percentile(ttft, 0.5),
        "ttft_p99_ms": percentile(ttft, 0.99),
        "waited_for_memory": run.waited,
        "group_step_ms_mean": statistics.mean(r.step_ms for r in run.steps[0]),
    }


def calibrate(runs: dict[str, PolicyRun]) -> CostModel:
    """Fits the router's step-time coefficients to each instance's own measured work per step."""
    samples = [
        (
            float(r.kv_tokens_read),
            float(r.home_tokens),
            float(r.rows_routed),
            sum(r.section_ms.get(n, 0.0) for n in (*ATTENTION, "moe_compute")),
        )
        for run in runs.values()
        for log in run.steps
        for r in log
    ]
    return CostModel.fit(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trace", type=Path, default=TRACE)
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--rate", type=float, default=4.0, help="mean arrivals a second")
    parser.add_argument("--max-input", type=int, default=3000, help="the longest prompt after scaling")
    parser.add_argument("--max-output", type=int, default=48)
    parser.add_argument("--policies", nargs="+", default=["static", "balanced", "dcp", "uniform"])
    parser.add_argument("--out", type=Path, default=RESULTS / "policy_comparison.json")
    args = parser.parse_args()

    console = Console(width=140)
    trace = load_mooncake(args.trace, args.requests)
    requests = at_rate(fit_lengths(trace, args.max_input, args.max_output, min_input=8), args.rate)
    console.print(f"workload: {describe(requests)}")
    runs = {}
    for policy in args.policies:
        console.rule(policy)
        runs[policy] = run_policy(policy, requests, console)
    rows = {policy: summarise(run) for policy, run in runs.items()}
    cost = calibrate(runs)
    cost.save(COST_MODEL)
    result = {
        "benchmark": "placement policies on a long-tailed workload, 4 CPU instances (tiny model, gloo)",
        "workload": {"trace": args.trace.name, **describe(requests)},
        "instance_pages": PAGES,
        "policies": rows,
        "fitted_cost_model": cost.__dict__,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    plot(rows, args.out.with_suffix(".png"))
    table = Table("metric", *rows, title=result["benchmark"])
    for metric in next(iter(rows.values())):
        table.add_row(metric, *[_fmt(rows[p][metric]) for p in rows])
    console.print(table)
    console.print(f"wrote {args.out}")


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def plot(rows: dict[str, dict[str, float | None]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("straggler ratio (max / median)", ["straggler_kv_tokens", "straggler_attention_time"]),
        ("TPOT ms", ["tpot_p50_ms", "tpot_p99_ms"]),
        ("KV occupancy spread", ["kv_occupancy_spread_mean", "kv_occupancy_spread_max"]),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(13, 3.8))
    policies = list(rows)
    for ax, (title, metrics) in zip(axes, panels, strict=True):
        width = 0.8 / len(metrics)
        for j, metric in enumerate(metrics):
            values = [rows[p][metric] or 0.0 for p in policies]
            ax.bar([i + j * width for i in range(len(policies))], values, width, label=metric)
        ax.set_xticks([i + width * (len(metrics) - 1) / 2 for i in range(len(policies))], policies)
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
