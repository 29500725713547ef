"""The highest request rate a policy sustains: bisection over the rate a workload is time-scaled to.

A rate is sustainable under an SLO when at least `attainment` of the requests (refused ones count against it) have
a TPOT within the SLO after an admission wait within `max_wait_s`. The first and last `edge` of the requests by
arrival are left out of the count: they meet a group that is still filling up or already draining. Runs are cached
by rate, so the bisections of several SLOs share them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nanocp.sim.cluster import Cluster, PolicySpec
from nanocp.sim.loop import simulate
from nanocp.sim.metrics import SimResult
from nanocp.workload import TraceRequest, at_rate


@dataclass(frozen=True)
class Slo:
    tpot_s: float
    attainment: float = 0.9
    max_wait_s: float = 2.0

    def met(self, result: SimResult, edge: float = 0.1) -> bool:
        return result.steady(edge).attainment(self.tpot_s, self.max_wait_s) >= self.attainment


def at_rates(
    cluster: Cluster, policy: PolicySpec, requests: list[TraceRequest], **options: Any
) -> Callable[[float], SimResult]:
    """run(rate): the workload time-scaled to `rate` requests a second, simulated (options as `simulate` takes)."""

    def run(rate: float) -> SimResult:
        return simulate(cluster, policy, at_rate(requests, rate), **options)

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
