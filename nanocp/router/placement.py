"""The interface every placement policy implements, and the pieces policies build placements from.

A policy sees a request's footprint and the ready instances' loads as the router counts them, and answers with a
Placement, or None when nothing fits now (the request then waits for pages to be released). Footprints, shards and
placements themselves are in nanocp.placement, shared with the worker, the SDK and the simulator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from nanocp.placement import Footprint, Placement, Shard


@dataclass(frozen=True)
class InstanceLoad:
    """One ready instance as the router counts it (its own grants, not the worker's reports)."""

    id: str
    page_size: int
    pages_total: int
    pages_committed: int = 0
    home_batch: int = 0
    routed_rows: int = 0  # query rows of CP requests it sends or answers each decode step
    group: str = ""  # shards of a request stay within its home's decode group
    rank: int = 0
    domain: str = ""  # topology domain: shards prefer their home's

    @property
    def pages_free(self) -> int:
        return self.pages_total - self.pages_committed


def by_group(instances: list[InstanceLoad]) -> dict[str, list[InstanceLoad]]:
    """The instances of each decode group: a request's shards stay within its home's group, which steps alone."""
    groups: dict[str, list[InstanceLoad]] = {}
    for i in instances:
        groups.setdefault(i.group, []).append(i)
    return groups


def contiguous_shards(footprint: Footprint, holders: list[InstanceLoad], pages: list[int]) -> list[Shard]:
    """Shards in position order on `holders`, shard i taking pages[i] pages; the last one is the tail."""
    page_size = holders[0].page_size
    starts = [sum(pages[:i]) * page_size for i in range(len(pages))]
    return [Shard(h.rank, start, n, h.id) for h, start, n in zip(holders, starts, pages, strict=True)]


def even_split(total: int, parts: int) -> list[int]:
    """`total` pages in `parts` shares differing by at most one, larger first."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def capped_split(total: int, caps: list[int]) -> list[int] | None:
    """`total` pages over holders that have `caps` pages free: as even as the caps allow (water-filling: a holder
    short of the even share gives all it has, the others share the rest evenly), at least one page each, in the
    caps' order; None when they cannot hold it."""
    if total < len(caps) or sum(caps) < total or min(caps, default=0) < 1:
        return None
    shares = [0] * len(caps)
    left, count = total, len(caps)
    for i in sorted(range(len(caps)), key=lambda i: caps[i]):
        shares[i] = min(caps[i], left // count + (1 if left % count else 0))
        left, count = left - shares[i], count - 1
    return shares


class PlacementPolicy(Protocol):
    name: str

    def place(self, footprint: Footprint, instances: list[InstanceLoad]) -> Placement | None:
        """A placement whose quotas fit the instances' free pages, or None when nothing fits now."""
        ...

    def grow(self, placement: Placement, pages: int, instances: list[InstanceLoad]) -> Placement | None:
        """The placement with room for `pages` more pages after its tail, existing KV left where it is; None when
        there is no room."""
        ...

    def reservation(self, footprint: Footprint, instances: list[InstanceLoad]) -> dict[str, int]:
        """The free pages, by instance, that a request which fits nowhere now waits for: once they are free, this
        policy places it. Admission keeps them for it while it has precedence."""
        ...


def whole_reservation(footprint: Footprint, instances: list[InstanceLoad]) -> dict[str, int]:
    """A request placed whole waits for its pages on the instance closest to having them (the most free pages) of
    those that could hold it; nothing when none could."""
    fits = [i for i in instances if footprint.pages(i.page_size) <= i.pages_total]
    best = min(fits, key=lambda i: (-i.pages_free, i.id), default=None)
    return {best.id: footprint.pages(best.page_size)} if best is not None else {}


def grow_tail(placement: Placement, pages: int, instances: list[InstanceLoad]) -> Placement | None:
    """A larger quota for the tail, when its holder has the pages: the degree stays."""
    tail = placement.shards[-1]
    holder = next((i for i in instances if i.id == tail.instance), None)
    if holder is None or holder.pages_free < pages:
        return None
    grown = Shard(tail.rank, tail.start, tail.page_quota + pages, tail.instance)
    return Placement(placement.home, [*placement.shards[:-1], grown])


def add_shard(placement: Placement, pages: int, holder: InstanceLoad) -> Placement:
    """One more shard, on `holder`, starting where the tail's quota ends: the degree grows by one."""
    tail = placement.shards[-1]
    start = tail.start + tail.page_quota * holder.page_size
    return Placement(placement.home, [*placement.shards, Shard(holder.rank, start, pages, holder.id)])
