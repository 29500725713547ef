"""The highest request rate a policy sustains: bisection over the rate a workload is time-scaled to.

A rate is sustainable under an SLO when at least `attainment` of the requests (refused ones count against it) have
a TPOT within the SLO after an admission wait within `max_wait_s`. The first and last `edge` of the requests by
arrival are left out of the count: they meet a group that is still filling up or already draining. Each rate gets
`duration_s` of arrivals, however many requests that is: a fixed count would arrive in a burst at high rates, and
KV memory and the admission queue would absorb a burst that no group sustains. Near the highest rate, one run's
attainment swings by several points with the arrival pattern (a rate 0.01% higher can pass where the lower one
failed), so a rate can be judged on `windows` runs starting at different points of the trace, pooled. A run stops
as soon as too many requests miss whatever the SLO (nanocp.sim.loop.GiveUp), so overload costs little. Runs are
cached by rate, so the bisections of several SLOs (sharing attainment and max_wait_s) share them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nanocp.sim.cluster import Cluster, PolicySpec
from nanocp.sim.loop import GiveUp, simulate
from nanocp.sim.metrics import SimResult
from nanocp.workload import TraceRequest, at_rate, repeat, rotated

EDGE = 0.1  # of the requests at either end, left out of the count
MIN_REQUESTS = 200


@dataclass(frozen=True)
class Slo:
    tpot_s: float
    attainment: float = 0.9
    max_wait_s: float = 2.0

    def met(self, result: SimResult) -> bool:
        """Whether a steady result (edges left out, as `at_rates` runs answer) meets the SLO."""
        return not result.stopped and result.attainment(self.tpot_s, self.max_wait_s) >= self.attainment


def at_rates(
    cluster: Cluster,
    policy: PolicySpec,
    trace: list[TraceRequest],
    duration_s: float,
    slo: Slo,
    windows: int = 1,
    **options: Any,
) -> Callable[[float], SimResult]:
    """run(rate): `duration_s` of the trace (repeated as needed) time-scaled to `rate` requests a second, simulated
    (options as `simulate` takes) and without its edges; with `windows` > 1, that many such runs, the i-th starting
    i / windows of the way into the trace, pooled. A run is given up once its misses alone would fail the pooled
    attainment of `slo`."""

    def one(start: int, rate: float) -> SimResult:
        count = max(MIN_REQUESTS, round(rate * duration_s))
        cut = int(EDGE * count)
        misses = int(windows * (1 - slo.attainment) * (count - 2 * cut))
        give_up = GiveUp(slo.max_wait_s, misses, (cut, count - cut))
        requests = repeat(rotated(trace, start), count)
        return simulate(cluster, policy, at_rate(requests, rate), give_up=give_up, **options).steady(EDGE)

    def run(rate: float) -> SimResult:
        results: list[SimResult] = []
        for start in (i * len(trace) // windows for i in range(windows)):
            results.append(one(start, rate))
            if results[-1].stopped:
                break
        return SimResult.pooled(results)

    return run


def max_rates(
    run: Callable[[float], SimResult],
    slos: list[Slo],
    guess: float,
    rel_tol: float = 0.05,
    runs: dict[float, SimResult] | None = None,
) -> dict[Slo, float]:
    """For each SLO, the highest rate (within rel_tol) at which `run(rate)` meets it; 0 when not even guess / 64 does.
    `runs` caches results by rate (pass one in to share it further)."""
    cache = runs if runs is not None else {}

    def met(rate: float, slo: Slo) -> bool:
        if rate not in cache:
            cache[rate] = run(rate)
        return slo.met(cache[rate])

    rates = {}
    for slo in sorted(slos, key=lambda s: -s.tpot_s):  # loosest first: its runs bracket the tighter ones
        known = sorted(cache)
        passing = [r for r in known if slo.met(cache[r])]
        failing = [r for r in known if not slo.met(cache[r])]
        hi = min(failing, default=None)
        lo = max((r for r in passing if hi is None or r < hi), default=None)
        start = lo or hi or guess
        while lo is None:
            if not met(start, slo):
                hi, start = start, start / 2
                if start < guess / 64:
                    break
            else:
                lo = start
        while lo is not None and hi is None:
            start *= 2
            if met(start, slo):
                lo = start
            else:
                hi = start
        if lo is None:
            rates[slo] = 0.0
            continue
        assert hi is not None
        while hi / lo > 1 + rel_tol:
            middle = (lo * hi) ** 0.5
            lo, hi = (middle, hi) if met(middle, slo) else (lo, middle)
        rates[slo] = lo
    return rates
