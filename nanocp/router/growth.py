"""Growth: when a request's placement grows, and by how much.

With --reserve-output-tokens a request is placed for its prompt and that many new tokens. Its home asks for more
(`asks_to_grow`) while `GROW_AHEAD_PAGES` pages of its tail are still free, so the answer arrives before a decode
step must wait for it; the router then asks the policy for room for the next reservation, or for what the request
may still need if that is less (`grow`). None means no room: the home ends the request with RESOURCE_EXHAUSTED.
The service and the simulator (nanocp.sim) both decide with these functions.
"""

from __future__ import annotations

import math

from nanocp.limits import GROW_AHEAD_PAGES
from nanocp.router.placement import Footprint, InstanceLoad, Placement, PlacementPolicy


def covered_tokens(placement: Placement, page_size: int) -> int:
    """Positions the placement's quotas cover: up to the end of its tail."""
    tail = placement.shards[-1]
    return tail.start + tail.page_quota * page_size


def asks_to_grow(placement: Placement, footprint: Footprint, tokens: int, page_size: int) -> bool:
    """Whether a request holding `tokens` tokens (prompt and output so far) asks its placement to grow: it may still
    need positions past its tail and fewer than GROW_AHEAD_PAGES pages of the tail are left."""
    covered = covered_tokens(placement, page_size)
    return covered < footprint.tokens and covered - tokens < GROW_AHEAD_PAGES * page_size


def growth_pages(placement: Placement, footprint: Footprint, page_size: int, reserve: int | None) -> int:
    """Pages to add: the next `reserve` tokens, or what the footprint still lacks if that is less."""
    missing = footprint.tokens - covered_tokens(placement, page_size)
    return math.ceil(min(missing, reserve or missing) / page_size)


def grow(
    policy: PlacementPolicy,
    placement: Placement,
    footprint: Footprint,
    reserve: int | None,
    loads: list[InstanceLoad],
    page_size: int,
) -> Placement | None:
    """The grown placement (not yet committed), or None when the footprint is covered or there is no room."""
    pages = growth_pages(placement, footprint, page_size, reserve)
    return policy.grow(placement, pages, loads) if pages > 0 else None
