"""`uniform`: every request at the same CP degree D, as vLLM's decode context parallelism shards every request.

The home is picked as `static` picks it; the shards go to D instances of its group, the home first, then the ones
with the most free KV, each taking an even share of the footprint. A baseline: it pays CP's routing for requests that
are short enough to stay local.
"""

from __future__ import annotations

from nanocp.placement import Footprint, Placement
from nanocp.router.placement import InstanceLoad, contiguous_shards, even_split, grow_tail
from nanocp.router.policies.static import pick_home


class UniformPolicy:
    name = "uniform"

    def __init__(self, degree: int) -> None:
        if degree < 1:
            raise ValueError(f"the CP degree of the uniform policy must be at least 1, got {degree}")
        self.degree = degree

    def place(self, footprint: Footprint, instances: list[InstanceLoad]) -> Placement | None:
        home = pick_home(instances)
        if home is None:
            return None
        group = [i for i in instances if i.group == home.group]
        total = footprint.pages(home.page_size)
        degree = min(self.degree, len(group), total)  # a shard holds at least one page
        holders = [home, *sorted((i for i in group if i is not home), key=lambda i: (-i.pages_free, i.id))][:degree]
        pages = even_split(total, degree)
        if any(n > h.pages_free for h, n in zip(holders, pages, strict=True)):
            return None
        return Placement(home.id, contiguous_shards(footprint, holders, pages))

    def grow(self, placement: Placement, pages: int, instances: list[InstanceLoad]) -> Placement | None:
        return grow_tail(placement, pages, instances)  # the degree is fixed

    def reservation(self, footprint: Footprint, instances: list[InstanceLoad]) -> dict[str, int]:
        """Its home is chosen by batch, not by free pages, and its shards spread over D instances: a request that
        fits nowhere now waits for the whole group to have room (nothing else is placed meanwhile)."""
        return {i.id: i.pages_total for i in instances}
