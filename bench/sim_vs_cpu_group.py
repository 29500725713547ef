"""How close the CPU-calibrated simulator comes to the real 4-instance CPU group, run after run.

A measurement, repeated, that no test on a shared machine can hold (tests/test_sim_calibration.py holds the committed
calibration to its results instead): calibrate on fresh runs of the group (24 requests of the committed Mooncake
head, under static and under dcp), then replay the next 24 requests on the group and in the simulator under static,
dcp and uniform D = 4 (the router deciding with the simulator's cost model): mean group step and median TPOT,
measured and simulated. Writes bench/results/sim_vs_cpu_group.json.

    .venv/bin/python bench/sim_vs_cpu_group.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import asdict
from pathlib import Path

from rich.console import Console
from rich.table import Table

from nanocp.harness.cpu_group import DCP, PAGES, check_workload, compare, fresh_calibration
from nanocp.sim.cluster import PolicySpec

RESULTS = Path(__file__).parent / "results"
POLICIES = [PolicySpec("static"), DCP, PolicySpec("uniform", 4)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS / "sim_vs_cpu_group.json")
    args = parser.parse_args()
    console = Console(width=140)
    rows = []
    table = Table("run", "policy", "step ms measured", "simulated", "TPOT p50 ms measured", "simulated")
    for repeat in range(args.repeats):
        with tempfile.TemporaryDirectory() as work:
            calibration = fresh_calibration(console, Path(work))
            for policy in POLICIES:
                comparison = compare(check_workload(), policy, calibration, PAGES, console, Path(work))
                errors = comparison.errors()
                rows.append({"repeat": repeat, **asdict(comparison), "errors": errors})
                table.add_row(
                    str(repeat),
                    comparison.policy,
                    f"{comparison.measured_step_ms:.1f}",
                    f"{comparison.simulated_step_ms:.1f} ({100 * errors['step']:+.0f}%)",
                    f"{comparison.measured_tpot_p50_ms:.1f}",
                    f"{comparison.simulated_tpot_p50_ms:.1f} ({100 * errors['tpot_p50']:+.0f}%)",
                )
    args.out.write_text(json.dumps({"benchmark": __doc__.split("\n")[0], "rows": rows}, indent=2) + "\n")
    console.print(table)
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
