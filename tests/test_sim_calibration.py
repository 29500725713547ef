"""The simulator, calibrated on CPU, against the real 4-instance CPU group on a workload it was not fitted on.

The CPU coefficients (bench/results/sim_calibration_cpu.json) were fitted on the first 40 requests of the committed
Mooncake head; here the group replays the next 24, under static and under dcp (same shard target, degree cap and
cost model in the router as in the simulator), and the simulator replays them too.

Tolerance: 35% on the mean group step and on the median TPOT. Four worker processes share two cores with whatever
else runs (other tests, other engineers), a step is mostly gloo latency and host work that contention stretches, and
a TPOT is a few dozen such steps, some with another request's prefill in them; in quiet runs the simulator lands
within about 5-25% (bench/sim_vs_cpu_group.py records it; docs/evaluation.md shows it). 35% still catches a model
that forgets the CP route's latency (dcp's steps run about twice static's on this machine) or the prefill chunks.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from rich.console import Console

from nanocp.sim.calibration import Calibration, default_path
from nanocp.sim.cluster import PolicySpec
from nanocp.sim.cpu_group import compare, mooncake_head

TOLERANCE = 0.35
PAGES = 256


@pytest.mark.parametrize(
    "policy", [PolicySpec("static"), PolicySpec("dcp", shard_tokens=1024, max_degree=4)], ids=lambda p: p.name
)
def test_simulator_predicts_the_cpu_groups_step_time_and_tpot_within_35_percent(
    policy: PolicySpec, tmp_path: Path
) -> None:
    requests = mooncake_head(24, rate=4.0, skip=40)
    comparison = compare(requests, policy, Calibration.load(default_path("cpu")), PAGES, Console(quiet=True), tmp_path)
    errors = comparison.errors()
    assert abs(errors["step"]) <= TOLERANCE, comparison
    assert abs(errors["tpot_p50"]) <= TOLERANCE, comparison
