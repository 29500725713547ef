"""Growth: the router's answer when a request's home asks for its placement to grow.

When to ask and by how much is the shared rule in nanocp.placement (`asks_to_grow`, `growth_pages`); here the router
asks the policy for room (`grow`). None means no room: the home ends the request with RESOURCE_EXHAUSTED. The
service and the simulator (nanocp.sim) both grow placements with this function.
"""

from __future__ import annotations

from nanocp.placement import Footprint, Placement, growth_pages
from nanocp.router.placement import InstanceLoad, PlacementPolicy


def grow(
    policy: PlacementPolicy,
    placement: Placement,
    footprint: Footprint,
    reserve: int | None,
    loads: list[InstanceLoad],
    page_size: int,
) -> Placement | None:
    """The grown placement (not yet committed), or None when the footprint is covered or there is no room."""
    pages = growth_pages(placement.shards, footprint, page_size, reserve)
    return policy.grow(placement, pages, loads) if pages > 0 else None
