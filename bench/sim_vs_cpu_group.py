"""How close the CPU-calibrated simulator comes to the real 4-instance CPU group, run after run.

The comparison of tests/test_sim_calibration.py (the next 24 requests of the committed Mooncake head after the 40 the
calibration was fitted on; the router deciding with the simulator's cost model), for static, dcp and uniform D = 4,
repeated: mean group step and median TPOT, measured and simulated. Writes bench/results/sim_vs_cpu_group.json.

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

from nanocp.sim.calibration import Calibration, default_path
from nanocp.sim.cluster import PolicySpec
from nanocp.sim.cpu_group import compare, mooncake_head

RESULTS = Path(__file__).parent / "results"
POLICIES = [PolicySpec("static"), PolicySpec("dcp", shard_tokens=1024, max_degree=4), PolicySpec("uniform", 4)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS / "sim_vs_cpu_group.json")
    args = parser.parse_args()
    console = Console(width=140)
    calibration = Calibration.load(default_path("cpu"))
    requests = mooncake_head(24, rate=4.0, skip=40)
    rows = []
    table = Table(
        "policy", "step ms measured", "simulated", "TPOT p50 ms measured", "simulated", title=__doc__.split("\n")[0]
    )
    for repeat in range(args.repeats):
        for policy in POLICIES:
            with tempfile.TemporaryDirectory() as work:
                comparison = compare(requests, policy, calibration, 256, console, Path(work))
            rows.append({"repeat": repeat, **asdict(comparison), "errors": comparison.errors()})
            table.add_row(
                comparison.policy,
                f"{comparison.measured_step_ms:.1f}",
                f"{comparison.simulated_step_ms:.1f} ({100 * comparison.errors()['step']:+.0f}%)",
                f"{comparison.measured_tpot_p50_ms:.1f}",
                f"{comparison.simulated_tpot_p50_ms:.1f} ({100 * comparison.errors()['tpot_p50']:+.0f}%)",
            )
    args.out.write_text(json.dumps({"benchmark": __doc__.split("\n")[0], "rows": rows}, indent=2) + "\n")
    console.print(table)
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
