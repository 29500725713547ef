"""`balanced`: no context parallelism, but the home chosen by predicted step time, not by request count.

The token-balanced static baseline: each request lives wholly on one instance, the one where adding it predicts the
fastest group step (nanocp.router.cost weighs its KV tokens, home batch and fixed cost). Much of
what DCP gains over `static` comes from balancing tokens rather than request counts; this baseline keeps a
comparison honest about how much is left for context parallelism itself.
"""

from __future__ import annotations

from nanocp.placement import Footprint, Placement
from nanocp.router.cost import CostModel
from nanocp.router.placement import InstanceLoad, by_group, contiguous_shards, grow_tail, whole_reservation


class BalancedPolicy:
    name = "balanced"

    def __init__(self, cost: CostModel | None = None) -> None:
        self.cost = cost or CostModel()

    def place(self, footprint: Footprint, instances: list[InstanceLoad]) -> Placement | None:
        scorers = {name: self.cost.scorer(members) for name, members in by_group(instances).items()}
        candidates = []
        for home in instances:
            pages = footprint.pages(home.page_size)
            if pages <= home.pages_free:
                placement = Placement(home.id, contiguous_shards(footprint, [home], [pages]))
                candidates.append((scorers[home.group](placement), home.home_batch, home.id, placement))
        return min(candidates, key=lambda c: c[:3])[3] if candidates else None

    def grow(self, placement: Placement, pages: int, instances: list[InstanceLoad]) -> Placement | None:
        return grow_tail(placement, pages, instances)

    def reservation(self, footprint: Footprint, instances: list[InstanceLoad]) -> dict[str, int]:
        return whole_reservation(footprint, instances)
