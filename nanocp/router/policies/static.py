"""`static`: no context parallelism. The whole request lives on its home, as SGLang's DP attention places it.

The home is the instance with the fewest home requests (MoE balance), ties to the most free KV pages, then to the
smallest id so a placement is reproducible. Only instances with room for the whole footprint are candidates: a
request never waits while another instance could take it.
"""

from __future__ import annotations

from nanocp.placement import Footprint, Placement
from nanocp.router.placement import InstanceLoad, contiguous_shards, grow_tail, whole_reservation


def pick_home(instances: list[InstanceLoad]) -> InstanceLoad | None:
    """Fewest home requests (MoE balance), then most free KV, then smallest id."""
    return min(instances, key=lambda i: (i.home_batch, -i.pages_free, i.id), default=None)


class StaticPolicy:
    name = "static"

    def place(self, footprint: Footprint, instances: list[InstanceLoad]) -> Placement | None:
        home = pick_home([i for i in instances if footprint.pages(i.page_size) <= i.pages_free])
        if home is None:
            return None
        return Placement(home.id, contiguous_shards(footprint, [home], [footprint.pages(home.page_size)]))

    def grow(self, placement: Placement, pages: int, instances: list[InstanceLoad]) -> Placement | None:
        return grow_tail(placement, pages, instances)

    def reservation(self, footprint: Footprint, instances: list[InstanceLoad]) -> dict[str, int]:
        return whole_reservation(footprint, instances)
