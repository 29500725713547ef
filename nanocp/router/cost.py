"""The predicted step time of a decode group, the one place where placement weighs KV, batch and routing.

A decode step of an instance reads its KV (attention) and runs its home tokens through the MoE layers (the all-to-all
traffic and expert work grow with them): its own work is

    own = kv_token_ms * KV tokens + home_token_ms * home batch + fixed_ms

The group steps in lockstep, so its step is paced by the slowest instance's own work; and a CP route is lockstep
too: every layer waits for the route's two legs before it goes on, so a route slows the whole group, not only the
instances it joins. The group's step is therefore

    step = max(own over the group) + (cp_step_ms + routed_row_ms * most routed rows, if any instance routes)

where `cp_step_ms` is the route's latency (paid once a step however many requests are split: the first split is
expensive, the next ones nearly free) and `routed_row_ms` the bytes of the busiest instance's rows. This is how the
simulator charges it (nanocp.sim.steptime), and measured on CPU over gloo the latency is most of what CP costs
(about a millisecond a layer). Coefficients come from measured step times (`fit`: each instance's own work plus the
routes it takes part in) or from the simulator's hardware model, saved as JSON for the router's --cost-model (files
without `cp_step_ms` load with 0); the defaults are of the Qwen3-30B-A3B shapes on an H100 (98 KB of KV per token at
about 3 TB/s, MoE work per token, a few microseconds per routed row and layer).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from nanocp.least_squares import lstsq
from nanocp.placement import Placement
from nanocp.router.placement import InstanceLoad


@dataclass(frozen=True)
class CostModel:
    kv_token_ms: float = 3.3e-5
    home_token_ms: float = 5e-3
    routed_row_ms: float = 5e-2
    fixed_ms: float = 2.0
    cp_step_ms: float = 0.0

    def own_ms(self, load: InstanceLoad) -> float:
        """The instance's own work in a step: its KV read, its home tokens and the fixed part."""
        return self._own(load.pages_committed * load.page_size, load.home_batch)

    def route_ms(self, most_rows: int) -> float:
        """What CP routes add to every instance's step, given the busiest instance's routed rows."""
        return self.cp_step_ms + self.routed_row_ms * most_rows if most_rows > 0 else 0.0

    def step_ms(self, load: InstanceLoad) -> float:
        """One instance's step as it measures it: its own work and the routes it takes part in (what `fit` fits)."""
        return self.own_ms(load) + self.route_ms(load.routed_rows)

    def group_ms(self, group: list[InstanceLoad]) -> float:
        """The group's predicted step: its slowest instance's own work plus the group-wide price of its routes."""
        if not group:
            return 0.0
        return max(self.own_ms(i) for i in group) + self.route_ms(max(i.routed_rows for i in group))

    def _own(self, kv_tokens: int, home_batch: int) -> float:
        return self.kv_token_ms * kv_tokens + self.home_token_ms * home_batch + self.fixed_ms

    def scorer(self, group: list[InstanceLoad]) -> Callable[[Placement], float]:
        """A candidate placement's price: group_ms of `group` once it is added (`parts`, summed)."""
        parts = self.parts(group)
        return lambda placement: sum(parts(placement))

    def parts(self, group: list[InstanceLoad]) -> Callable[[Placement], tuple[float, float]]:
        """A candidate placement's price in its two parts, once it is added to `group`: the slowest instance's own
        work, and the group-wide price of the routes, where a split pays its route's latency even when other routes
        already run. They end; a split that pays only while riding on another's route keeps the group routing for
        good, which greedy choices made on the sunk latency drift into.
        For many candidates: the instances' own times and rows are ranked once, so a candidate costs the instances
        it touches, not the whole group."""
        own_ranked = sorted(((self.own_ms(i), i.id) for i in group), reverse=True)
        rows_ranked = sorted(((i.routed_rows, i.id) for i in group), reverse=True)
        loads = {i.id: i for i in group}
        routing = bool(rows_ranked) and rows_ranked[0][0] > 0

        def price(placement: Placement) -> tuple[float, float]:
            pages: Counter[str] = Counter()
            for shard in placement.shards:
                pages[shard.instance] += shard.page_quota
            rows = placement.routed_rows
            touched = {*pages, placement.home, *rows} & loads.keys()
            own = max(
                (
                    self._own(
                        (loads[id].pages_committed + pages[id]) * loads[id].page_size,
                        loads[id].home_batch + (id == placement.home),
                    )
                    for id in touched
                ),
                default=0.0,
            )
            own = max(own, next((ms for ms, id in own_ranked if id not in touched), 0.0))
            most_rows = max((loads[id].routed_rows + rows.get(id, 0) for id in touched), default=0)
            most_rows = max(most_rows, next((r for r, id in rows_ranked if id not in touched), 0))
            return own, self.route_ms(most_rows) + (self.cp_step_ms if rows and routing else 0.0)

        return price

    @classmethod
    def fit(cls, samples: list[tuple[float, float, float, float]]) -> CostModel:
        """Least squares over (kv tokens, home tokens, routed rows, measured ms) samples of instances' steps (their
        own work and the routes they take part in), coefficients >= 0."""
        x = [[kv, home, rows, 1.0, float(rows > 0)] for kv, home, rows, _ in samples]
        kv, home, rows, fixed, cp_step = lstsq(x, [ms for *_, ms in samples])
        return cls(kv, home, rows, fixed, cp_step)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> CostModel:
        return cls(**json.loads(path.read_text()))


def with_placement(placement: Placement, load: InstanceLoad, sign: int) -> InstanceLoad:
    """The instance's load with the placement's grants added (sign +1) or taken out (-1)."""
    pages = sum(s.page_quota for s in placement.shards if s.instance == load.id)
    return replace(
        load,
        pages_committed=load.pages_committed + sign * pages,
        home_batch=load.home_batch + sign * (load.id == placement.home),
        routed_rows=load.routed_rows + sign * placement.routed_rows.get(load.id, 0),
    )
