"""The predicted step time of an instance, the one place where placement weighs KV, batch and routing.

A decode step of an instance reads its KV (attention), runs its home tokens through the MoE layers (the all-to-all
traffic and expert work grow with them), and routes the query rows and partials of CP requests. So

    t = kv_token_ms * KV tokens + home_token_ms * home batch + routed_row_ms * routed rows + fixed_ms
        + cp_step_ms if it routes any rows

and the group's step is paced by its slowest instance. `cp_step_ms` is the route's latency, paid once a step by an
instance that takes part in any CP route whatever its row count: measured on CPU over gloo it is most of what CP
costs (about a millisecond a layer), where a per-row price alone would call CP nearly free. Coefficients come from
measured step times (`fit`) or from the simulator's hardware model (nanocp.sim), saved as JSON for the router's
--cost-model (files without `cp_step_ms` load with 0); the defaults are of the Qwen3-30B-A3B shapes on an H100
(98 KB of KV per token at about 3 TB/s, MoE work per token, a few microseconds per routed row and layer).
"""

from __future__ import annotations

import json
import math
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

    def step_ms(self, load: InstanceLoad) -> float:
        return self._ms(load.pages_committed * load.page_size, load.home_batch, load.routed_rows)

    def _ms(self, kv_tokens: int, home_batch: int, routed_rows: int) -> float:
        return (
            self.kv_token_ms * kv_tokens
            + self.home_token_ms * home_batch
            + self.routed_row_ms * routed_rows
            + self.fixed_ms
            + (self.cp_step_ms if routed_rows > 0 else 0.0)
        )

    def slowest_ms(self, placement: Placement, group: list[InstanceLoad]) -> float:
        """The predicted step time of the group's slowest instance once `placement` is added."""
        return self.scorer(group)(placement)

    def scorer(self, group: list[InstanceLoad]) -> Callable[[Placement], float]:
        """slowest_ms over `group` for many candidate placements: the instances' own times are computed once, so a
        candidate costs the instances it touches, not the whole group."""
        ranked = sorted(((self.step_ms(i), i.id) for i in group), reverse=True)
        loads = {i.id: i for i in group}

        def slowest_ms(placement: Placement) -> float:
            pages: Counter[str] = Counter()
            for shard in placement.shards:
                pages[shard.instance] += shard.page_quota
            rows = placement.routed_rows
            touched = {*pages, placement.home, *rows} & loads.keys()
            worst = max(
                (
                    self._ms(
                        (loads[id].pages_committed + pages[id]) * loads[id].page_size,
                        loads[id].home_batch + (id == placement.home),
                        loads[id].routed_rows + rows.get(id, 0),
                    )
                    for id in touched
                ),
                default=-math.inf,
            )
            untouched = next((ms for ms, id in ranked if id not in touched), -math.inf)
            return max(worst, untouched)

        return slowest_ms

    @classmethod
    def fit(cls, samples: list[tuple[float, float, float, float]]) -> CostModel:
        """Least squares over (kv tokens, home tokens, routed rows, measured ms) samples, coefficients >= 0."""
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
