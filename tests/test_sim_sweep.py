"""Finding the highest sustainable request rate: the bisection itself, and a small sweep of real policies."""

from __future__ import annotations

from nanocp.sim.cluster import Cluster, PolicySpec
from nanocp.sim.hardware import DEVICES, LINKS
from nanocp.sim.metrics import RequestOutcome, SimResult
from nanocp.sim.shapes import SHAPES
from nanocp.sim.steptime import Coefficients
from nanocp.sim.sweep import Slo, at_rates, max_rates
from nanocp.workload import long_tailed, repeat, rotated


def fake_run(capacity: float) -> tuple[list[float], object]:
    """A group whose TPOT grows with the rate: 10 ms at no load, the SLO's 30 ms at `capacity`."""
    calls: list[float] = []

    def run(rate: float) -> SimResult:
        calls.append(rate)
        tpot = 0.010 + 0.020 * rate / capacity
        outcomes = [RequestOutcome(0.0, 100, 11, "ok", 0.0, 0.0, 10 * tpot) for _ in range(50)]
        return SimResult(outcomes)

    return calls, run


def test_bisection_finds_the_rate_where_the_slo_stops_being_met_within_its_tolerance() -> None:
    calls, run = fake_run(capacity=37.0)
    rates = max_rates(run, [Slo(0.030), Slo(0.050)], guess=5.0, rel_tol=0.02)  # type: ignore[arg-type]
    assert 37.0 / 1.02 <= rates[Slo(0.030)] <= 37.0
    assert 74.0 / 1.02 <= rates[Slo(0.050)] <= 74.0, "50 ms: 10 + 20 r / 37 <= 50 until r = 74"
    assert len(calls) == len(set(calls)), "each rate is simulated once, whatever the SLOs"


def test_a_policy_that_never_meets_the_slo_sustains_zero() -> None:
    _, run = fake_run(capacity=37.0)
    assert max_rates(run, [Slo(0.005)], guess=5.0) == {Slo(0.005): 0.0}  # type: ignore[arg-type]


def test_a_small_sweep_of_the_routers_policies_on_a_long_tailed_mix() -> None:
    # 8 H100-like instances, a KV-heavy mix: splitting long requests should never sustain less than uniform at D = 8,
    # and every policy sustains something under a 50 ms SLO.
    group = Cluster(SHAPES["qwen3-30b-a3b"], DEVICES["h100"], LINKS["nvlink"], 8, Coefficients(), kv_bytes=20e9)
    trace = long_tailed(2000, seed=1, long_share=0.3)
    slo = Slo(0.050)
    rates = {}
    dcp = PolicySpec("dcp", shard_tokens=16384)
    for policy in (PolicySpec("static"), dcp, PolicySpec("uniform", 8)):
        run = at_rates(group, policy, trace, 10.0, slo, max_tokens=512)
        rates[policy.label] = max_rates(run, [slo], guess=20.0, rel_tol=0.1)[slo]
    assert all(rate > 0 for rate in rates.values()), rates
    assert rates["dcp"] >= rates["uniform D=8"] / 1.1, rates
    result = at_rates(group, dcp, trace, 10.0, slo, max_tokens=512)(rates["dcp"])
    assert slo.met(result), "the rate found is one the policy sustains"
    assert result.summary()["cp_degree_mean"] > 1


def test_a_rotated_trace_plays_every_request_once_in_time_order() -> None:
    trace = long_tailed(50, seed=3)
    turned = rotated(trace, 20)
    assert [r.input_tokens for r in turned] == [r.input_tokens for r in trace[20:] + trace[:20]]
    arrivals = [r.arrival_s for r in repeat(turned, 120)]
    assert arrivals == sorted(arrivals), "no arrival goes back in time"


def test_windows_pool_runs_from_different_points_of_the_trace() -> None:
    group = Cluster(SHAPES["qwen3-30b-a3b"], DEVICES["h100"], LINKS["nvlink"], 4, Coefficients(), kv_bytes=20e9)
    trace = long_tailed(400, seed=2, long_share=0.3)
    slo = Slo(0.050)
    one, two = (at_rates(group, PolicySpec("balanced"), trace, 5.0, slo, w, max_tokens=256)(10.0) for w in (1, 2))
    assert len(two.outcomes) == 2 * len(one.outcomes) == 2 * (200 - 2 * 20)  # edges left out of each run
    assert two.outcomes[: len(one.outcomes)] == one.outcomes, "the first window is the single run"
    assert two.steps.steps > one.steps.steps and not two.stopped
