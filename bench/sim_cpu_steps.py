"""Step samples of the real 4-instance CPU group, for the simulator's CPU calibration (nanocp sim calibrate).

Replays the head of the Mooncake trace (nanocp.harness.cpu_group: 40 requests fitted to the tiny model, 4 a second)
under static, dcp and uniform (so steps with and without CP routes), 256 KV pages a worker, each --repeats times (the
fit then averages over how busy the machine was), and keeps every group
step: per instance its home tokens, KV tokens read, routed rows, step time and routing time (CP and MoE routes and
the step exchange, waits included). Its own work is the step less its routing; the group's routing is what the
fastest router among them paid. Writes bench/results/sim_cpu_steps.json. CPU timings on 2 shared cores are noisy.

    .venv/bin/python bench/sim_cpu_steps.py [--requests 40] [--rate 4] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console

from nanocp.harness.cpu_group import DCP, PAGES, mooncake_head, router_args, run_cpu_group
from nanocp.sim.cluster import PolicySpec
from nanocp.workload import describe

RESULTS = Path(__file__).parent / "results"
POLICIES = [PolicySpec("static"), DCP, PolicySpec("uniform", 4)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--rate", type=float, default=4.0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "sim_cpu_steps.json")
    args = parser.parse_args()
    console = Console(width=140)
    requests = mooncake_head(args.requests, args.rate)
    runs = []
    for _ in range(args.repeats):
        for policy in POLICIES:
            console.rule(policy.label)
            run = run_cpu_group(requests, router_args(policy), PAGES, console)
            runs.append(
                {
                    "policy": policy.label,
                    "router_args": router_args(policy),
                    "tpot_ms": [round(x.tpot_ms, 3) for x in run.latency],
                    "steps": run.samples(),
                }
            )
            console.print(f"{policy.label}: {len(runs[-1]['steps'])} group steps")
    result = {
        "benchmark": "step samples of a 4-instance CPU group (tiny model, gloo) for the simulator's calibration",
        "workload": describe(requests),
        "instances": 4,
        "instance_pages": PAGES,
        "sample": ["home_tokens", "kv_tokens_read", "rows_routed", "step_ms", "routing_ms"],
        "runs": runs,
    }
    args.out.write_text(json.dumps(result) + "\n")
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
