"""The simulator against the real 4-instance CPU group: what can be checked without trusting the machine's clock.

How close a fresh calibration comes on this machine is a measurement, not a test: four worker processes share two
cores with whatever else runs, and a machine that changes within the minute a sitting takes makes the fit miss by
half (bench/results/sim_vs_cpu_group.json has such a repeat). bench/sim_vs_cpu_group.py measures it, run after run.
What stays here:

- The simulator, with the committed CPU calibration, replays the check workload within 35% of the mean group step
  and the median TPOT that bench/sim_vs_cpu_group.py measured on the real group (the median over its repeats), and
  the steps of uniform D = 4 (every request split) exceed static's by the measured factor within 20%. Both sides
  are committed files, so this is exact arithmetic: it fails when the simulator's code drifts from the group it
  models (forgets the CP route's latency, CP steps run about 1.5 times static's, or the prefill chunks), never
  because the machine is busy. dcp, which splits only where its cost model predicts a faster step, is left out
  until bench/sim_vs_cpu_group.py measures it again: the committed rows are of a dcp that split by a token floor.
- The real group replays the check workload under uniform D = 4 through the harness the calibration uses, and its
  step logs hold what the CPU fit takes: steps every member logged, CP routes among them, every request streamed to
  its end.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from nanocp.harness.cpu_group import CP, PAGES, check_workload, cpu_cluster, router_args, run_cpu_group
from nanocp.sim.calibration import RESULTS, Calibration
from nanocp.sim.cluster import PolicySpec
from nanocp.sim.data import calibration_path
from nanocp.sim.loop import simulate

TOLERANCE = 0.35
RATIO_TOLERANCE = 0.20
POLICIES = [PolicySpec("static"), CP]


def measured(policy: PolicySpec) -> dict[str, float]:
    """The real group's mean step and median TPOT under `policy`, the median over the benchmark's repeats."""
    rows = [
        r for r in json.loads((RESULTS / "sim_vs_cpu_group.json").read_text())["rows"] if r["policy"] == policy.label
    ]
    assert rows, f"bench/results/sim_vs_cpu_group.json has no {policy.label} rows"
    return {
        "step": statistics.median(r["measured_step_ms"] for r in rows),
        "tpot_p50": statistics.median(r["measured_tpot_p50_ms"] for r in rows),
    }


def simulated(policy: PolicySpec) -> dict[str, float]:
    cluster = cpu_cluster(Calibration.load(calibration_path("cpu")), PAGES)
    summary: dict[str, Any] = simulate(cluster, policy, check_workload(), max_tokens=None).summary()
    return {"step": summary["step_ms_mean"], "tpot_p50": summary["tpot_p50_ms"]}


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p.label)
def test_the_committed_calibration_predicts_the_measured_group_within_35_percent(policy: PolicySpec) -> None:
    real, model = measured(policy), simulated(policy)
    errors = {name: model[name] / real[name] - 1 for name in real}
    assert all(abs(e) <= TOLERANCE for e in errors.values()), (real, model)


def test_the_simulator_charges_cp_routes_as_the_group_pays_them() -> None:
    static = PolicySpec("static")
    real = measured(CP)["step"] / measured(static)["step"]
    model = simulated(CP)["step"] / simulated(static)["step"]
    assert real > 1.2, "the measured group pays for CP routes"
    assert abs(model / real - 1) <= RATIO_TOLERANCE, (real, model)


def test_the_real_group_logs_the_steps_the_cpu_fit_takes(tmp_path: Path) -> None:
    cost_model = tmp_path / "cost_model.json"
    cpu_cluster(Calibration.load(calibration_path("cpu")), PAGES).step_model().router_cost().save(cost_model)
    requests = check_workload()
    run = run_cpu_group(requests, router_args(CP, cost_model), PAGES, Console(quiet=True))

    assert len(run.latency) == len(requests), "every request streamed to its end (a failed stream raises)"
    samples = run.samples()
    assert samples and all(len(group) == 4 for group in samples), "steps every member logged, in rank order"
    assert all(len(instance) == 5 for group in samples for instance in group)
    assert any(instance[2] > 0 for group in samples for instance in group), "uniform split the requests: CP routes"
