"""What a simulation reports: each request's fate and latencies, and the group's steps in aggregate."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field


@dataclass
class RequestOutcome:
    arrival_s: float
    prompt_tokens: int
    output_tokens: int  # true length, at most max_tokens
    status: str = ""  # ok; refused (never fits, or the admission queue is full); exhausted (no room to grow)
    placed_s: float | None = None
    first_token_s: float | None = None
    finished_s: float | None = None
    cp_degree: int = 0  # at its end

    @property
    def wait_s(self) -> float:
        """Admission wait: from arrival to placement."""
        return self.placed_s - self.arrival_s if self.placed_s is not None else math.inf

    @property
    def ttft_s(self) -> float:
        return self.first_token_s - self.arrival_s if self.first_token_s is not None else math.inf

    @property
    def tpot_s(self) -> float:
        """Time per output token after the first, as a client measures it."""
        if self.status != "ok" or self.finished_s is None or self.first_token_s is None:
            return math.inf
        return (self.finished_s - self.first_token_s) / (self.output_tokens - 1) if self.output_tokens > 1 else 0.0

    def good(self, tpot_slo_s: float, max_wait_s: float) -> bool:
        """Served within the TPOT SLO after an admission wait of at most `max_wait_s`."""
        return self.status == "ok" and self.wait_s <= max_wait_s and self.tpot_s <= tpot_slo_s


@dataclass
class StepStats:
    steps: int = 0
    busy_s: float = 0.0
    straggler_sum: float = 0.0  # of each step's slowest instance over its median (own work)
    kv_spread_sum: float = 0.0  # of each step's KV occupancy, max - min over instances, as a fraction of a pool
    kv_occupancy_sum: float = 0.0  # of each step's mean KV occupancy

    def add(self, step_s: float, straggler: float, kv_spread: float, kv_occupancy: float) -> None:
        self.steps += 1
        self.busy_s += step_s
        self.straggler_sum += straggler
        self.kv_spread_sum += kv_spread
        self.kv_occupancy_sum += kv_occupancy


@dataclass
class SimResult:
    outcomes: list[RequestOutcome]  # in arrival order
    steps: StepStats = field(default_factory=StepStats)
    duration_s: float = 0.0  # simulated
    stopped: bool = False  # given up as overload before every request arrived (nanocp.sim.loop.GiveUp)

    def steady(self, edge: float) -> SimResult:
        """The result without the first and last `edge` of the requests by arrival (filling up, draining)."""
        cut = int(edge * len(self.outcomes))
        return SimResult(self.outcomes[cut : len(self.outcomes) - cut], self.steps, self.duration_s, self.stopped)

    @classmethod
    def pooled(cls, results: list[SimResult]) -> SimResult:
        """Several runs as one: their requests and steps together; given up if any was."""
        steps = StepStats()
        for r in results:
            for name in vars(steps):
                setattr(steps, name, getattr(steps, name) + getattr(r.steps, name))
        return cls(
            [o for r in results for o in r.outcomes],
            steps,
            sum(r.duration_s for r in results),
            any(r.stopped for r in results),
        )

    def attainment(self, tpot_slo_s: float, max_wait_s: float) -> float:
        """The fraction of all requests (refused ones included) served within the SLO and the wait bound."""
        return sum(o.good(tpot_slo_s, max_wait_s) for o in self.outcomes) / len(self.outcomes)

    def summary(self) -> dict[str, float]:
        served = [o for o in self.outcomes if o.status == "ok"]
        tpots = [o.tpot_s for o in served if o.output_tokens > 1]
        waits = [o.wait_s for o in served]
        steps = max(1, self.steps.steps)
        return {
            "requests": len(self.outcomes),
            "served": len(served),
            "refused": sum(o.status == "refused" for o in self.outcomes),
            "exhausted": sum(o.status == "exhausted" for o in self.outcomes),
            "tpot_p50_ms": 1e3 * percentile(tpots, 0.5),
            "tpot_p99_ms": 1e3 * percentile(tpots, 0.99),
            "wait_p50_ms": 1e3 * percentile(waits, 0.5),
            "wait_p99_ms": 1e3 * percentile(waits, 0.99),
            "ttft_p50_ms": 1e3 * percentile([o.ttft_s for o in served], 0.5),
            "step_ms_mean": 1e3 * self.steps.busy_s / steps,
            "straggler_ratio_mean": self.steps.straggler_sum / steps,
            "kv_spread_mean": self.steps.kv_spread_sum / steps,
            "kv_occupancy_mean": self.steps.kv_occupancy_sum / steps,
            "cp_degree_mean": statistics.mean(o.cp_degree for o in served) if served else math.nan,
            "output_tokens_per_s": sum(o.output_tokens for o in served) / self.duration_s if self.duration_s else 0.0,
        }


def percentile(values: list[float], q: float) -> float:
    """The q-quantile by rank (no interpolation); NaN of nothing."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.floor(q * len(ordered)))] if ordered else math.nan
