"""How fast the simulator runs: 10,000 requests of the Mooncake trace (repeated) on 32 simulated H100s, per policy, in
one process. Writes bench/results/sim_speed.json. The issue's bar: under a minute on 2 cores.

    .venv/bin/python bench/sim_speed.py [--requests 10000] [--instances 32] [--rate 150] [--trace PATH]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from nanocp.sim.calibration import Calibration
from nanocp.sim.cluster import Cluster, PolicySpec
from nanocp.sim.data import calibration_path
from nanocp.sim.hardware import DEVICES, LINKS
from nanocp.sim.loop import simulate
from nanocp.sim.shapes import SHAPES
from nanocp.workload import at_rate, load_mooncake, repeat

RESULTS = Path(__file__).parent / "results"
TRACE = Path(__file__).resolve().parents[2] / "shared" / "traces" / "mooncake-synthetic.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--instances", type=int, default=32)
    parser.add_argument("--rate", type=float, default=150.0, help="requests a second (about what dcp sustains)")
    parser.add_argument("--trace", type=Path, default=TRACE, help="Mooncake JSON lines, plain or gzip")
    parser.add_argument("--out", type=Path, default=RESULTS / "sim_speed.json")
    args = parser.parse_args()
    n = args.instances
    coefficients = Calibration.load(calibration_path("gpu")).coefficients
    cluster = Cluster(SHAPES["qwen3-30b-a3b"], DEVICES["h100"], LINKS["nvlink"], n, coefficients)
    requests = at_rate(repeat(load_mooncake(args.trace), args.requests), args.rate)
    policies = [PolicySpec("static"), PolicySpec("balanced"), PolicySpec("uniform", 4), PolicySpec("uniform", n)]
    policies.append(PolicySpec("dcp"))
    console = Console()
    runs = []
    for policy in policies:
        with Progress(console=console, transient=True) as bar:
            task = bar.add_task(f"{policy.label}", total=len(requests))
            start = time.perf_counter()
            result = simulate(
                cluster,
                policy,
                requests,
                max_tokens=1024,
                progress=lambda done, total, task=task: bar.update(task, completed=done),
            )
            wall = time.perf_counter() - start
        runs.append(
            {"policy": policy.label, "wall_s": wall, "steps": result.steps.steps, "simulated_s": result.duration_s}
        )
    machine = f"{platform.processor() or platform.machine()}, Python {platform.python_version()}"
    out = {
        "trace": args.trace.name,
        "requests": args.requests,
        "instances": n,
        "rate": args.rate,
        "machine": machine,
        "runs": runs,
    }
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    table = Table("policy", "wall s", "steps", "simulated s", title=f"{args.requests} requests on {n} instances")
    for r in runs:
        table.add_row(r["policy"], f"{r['wall_s']:.1f}", str(r["steps"]), f"{r['simulated_s']:.0f}")
    console.print(table)


if __name__ == "__main__":
    main()
