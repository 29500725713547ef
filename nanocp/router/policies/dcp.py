"""`dcp`: a request split over several instances of its group only when the cost model predicts the group's step
gets faster; otherwise exactly where `balanced` puts it.

- Candidates: `balanced`'s placement (degree 1 at the home it scores best), then splits of degree 2 up to
  max_degree, the group's size and the request's tokens over the shard target (shards of the target at least on
  average: a finer split pays a route for too little KV to balance). A split's home is `balanced`'s home or the
  instance whose own work is least; its shards go to the home when it has room, then to the instances with the
  least own work or to those with the most free pages (the home's topology domain first), in shares as even as
  their free pages allow: so a request that fits on no single instance still fits in the free pages of several.
- Choice: the candidate with the lowest price over the request's life, ties to the smaller degree. Each is priced
  at its predicted group step (nanocp.router.cost: the slowest instance's own work plus the group-wide price of its
  CP routes, a split paying its route's latency in full), and a split also pays back the part of the balance it
  buys (the slowest instance's work it saves against `balanced`'s placement) that will not last: its route slows
  the group for the request's whole life, while balanced placement of later requests would undo most of a busy
  group's imbalance long before (`persistence`). So dcp splits only when the model says the group gets faster
  for the request's life, and never does worse by its own model than `balanced`.
- Every split must also pay for its route in memory (`route_pays`): the route's share of the step at most the
  request's share of the pages the group holds, so mostly on fast links and for large requests, and freely in an
  idle group. A request that fits on no single instance and fails it waits for room as under `balanced`; one larger
  than any instance is always split: that is what only DCP can serve (admission takes it only from memory the
  group has to spare: nanocp.router.admission).
"""

from __future__ import annotations

from collections.abc import Iterator

from nanocp.placement import Footprint, Placement
from nanocp.router.cost import CostModel, with_placement
from nanocp.router.placement import (
    InstanceLoad,
    add_shard,
    by_group,
    capped_split,
    contiguous_shards,
    grow_tail,
    whole_reservation,
)
from nanocp.router.policies.balanced import BalancedPolicy
from nanocp.router.policies.names import DEFAULT_MAX_DEGREE, DEFAULT_SHARD_TOKENS

DRAIN_LIFETIMES = 0.5  # the remaining life of the requests an instance holds, in lifetimes


class DCPPolicy:
    name = "dcp"

    def __init__(
        self,
        shard_tokens: int = DEFAULT_SHARD_TOKENS,
        max_degree: int = DEFAULT_MAX_DEGREE,
        cost: CostModel | None = None,
    ) -> None:
        if shard_tokens < 1 or max_degree < 1:
            raise ValueError(f"need shard_tokens >= 1 and max_degree >= 1, got {shard_tokens} and {max_degree}")
        self.shard_tokens = shard_tokens
        self.max_degree = max_degree
        self.cost = cost or CostModel()
        self.balanced = BalancedPolicy(self.cost)

    def place(self, footprint: Footprint, instances: list[InstanceLoad]) -> Placement | None:
        scored = self.scored(footprint, instances)
        return min(scored, key=lambda s: s[:2])[2] if scored else None

    def scored(self, footprint: Footprint, instances: list[InstanceLoad]) -> list[tuple[float, int, Placement]]:
        """Every candidate with its price over the request's life (ms a step) and degree; `balanced`'s placement
        first, priced at its predicted group step."""
        groups = by_group(instances)
        parts = {name: self.cost.parts(members) for name, members in groups.items()}
        group_of = {i.id: i.group for i in instances}
        priced = [(parts[group_of[p.home]](p), p) for p in self.candidates(footprint, instances)]
        whole_own = priced[0][0][0] if priced and priced[0][1].cp_degree == 1 else None
        scored = []
        for (own, route), p in priced:
            price = own + route
            group = groups[group_of[p.home]]
            if p.cp_degree > 1 and not route_pays(p, own, route, group):
                continue  # its route would cost the group more than admitting (or balancing) it this way gains
            if whole_own is not None and p.cp_degree > 1:
                level = sum(i.pages_committed for i in group) / len(group)
                price += (1 - persistence(p, level)) * max(0.0, whole_own - own)
            scored.append((price, p.cp_degree, p))
        return scored

    def candidates(self, footprint: Footprint, instances: list[InstanceLoad]) -> list[Placement]:
        whole = self.balanced.place(footprint, instances)
        groups = by_group(instances)
        if not any(route_may_pay(footprint, g, self.cost) for g in groups.values()):
            return [whole] if whole is not None else []  # skip pricing splits that cannot pass `route_pays`
        homes = [i for i in instances if whole is not None and i.id == whole.home]
        least_work = min(
            instances, key=lambda i: (self.cost.own_ms(i), i.home_batch, -i.pages_free, i.id), default=None
        )
        if least_work is not None and least_work not in homes:
            homes.append(least_work)
        splits = [p for home in homes for p in self._splits(footprint, home, groups[home.group])]
        return ([whole] if whole is not None else []) + splits

    def _splits(self, footprint: Footprint, home: InstanceLoad, group: list[InstanceLoad]) -> Iterator[Placement]:
        """Per degree, two sets of holders: the instances with the least own work (balance first) and those with
        the most free pages (fit first), the home's domain before others; shares as even as their free pages
        allow."""
        pages = footprint.pages(home.page_size)
        most = min(self.max_degree, len(group), pages, footprint.tokens // self.shard_tokens)
        others = [i for i in group if i is not home and i.pages_free > 0]
        orders = (
            sorted(others, key=lambda i: (i.domain != home.domain, self.cost.own_ms(i), -i.pages_free, i.id)),
            sorted(others, key=lambda i: (i.domain != home.domain, -i.pages_free, self.cost.own_ms(i), i.id)),
        )
        for degree in range(2, most + 1):
            tried = set()
            for order in orders:
                holders = ([home] if home.pages_free > 0 else []) + order
                holders = holders[:degree]
                key = tuple(h.id for h in holders)
                shares = capped_split(pages, [h.pages_free for h in holders]) if len(holders) == degree else None
                if shares is not None and key not in tried:
                    tried.add(key)
                    yield Placement(home.id, contiguous_shards(footprint, holders, shares))

    def grow(self, placement: Placement, pages: int, instances: list[InstanceLoad]) -> Placement | None:
        """The tail grows in place while it holds less than the shard target. Past it, one more shard on the group's
        instance with the least own work (home's domain first) is a candidate too, and the cost model chooses,
        ties to the larger tail; past the degree cap, or with no other instance free, the tail grows beyond it."""
        home = next((i for i in instances if i.id == placement.home), None)
        if home is None:
            return None
        group = [i for i in instances if i.group == home.group]
        larger_tail = grow_tail(placement, pages, group)
        tail_tokens = placement.shards[-1].page_quota * home.page_size
        new_shard = None
        if placement.cp_degree < self.max_degree and (tail_tokens >= self.shard_tokens or larger_tail is None):
            holders = {s.instance for s in placement.shards}
            others = [i for i in group if i.id not in holders and i.pages_free >= pages]
            best = min(
                others, key=lambda i: (i.domain != home.domain, self.cost.own_ms(i), -i.pages_free, i.id), default=None
            )
            new_shard = add_shard(placement, pages, best) if best is not None else None
        # Score each candidate whole, against the loads without the placement it replaces.
        group_ms = self.cost.scorer([with_placement(placement, i, -1) for i in group])
        scored = [(group_ms(c), c.cp_degree, c) for c in (larger_tail, new_shard) if c is not None]
        return min(scored, key=lambda s: s[:2])[2] if scored else None

    def reservation(self, footprint: Footprint, instances: list[InstanceLoad]) -> dict[str, int]:
        """A request waits for room whole, as under `balanced` (one larger than any instance does not wait)."""
        return whole_reservation(footprint, instances)


def persistence(split: Placement, level: float) -> float:
    """The share of a split's balance that lasts its route's life. The route lasts the request's life; the balance
    does not: unsplit, the pages the split moves off its home (`moved`) would leave the home that much above the
    group's level (KV pages an instance holds), and balanced placement of later requests closes that gap by sending
    them elsewhere while the home's requests drain: a level's worth in their remaining life, which for requests
    caught at a uniform age is half a lifetime (the router knows no request's output length, so it takes them as
    equal). The gap closes linearly over moved / level half-lifetimes; averaged over the request's life, the share
    that lasts is half the closing time when that is under one lifetime, else 1 - 1 / (2 closing time); all of it
    in an empty group."""
    moved = sum(s.page_quota for s in split.shards if s.instance != split.home)
    if level <= 0:
        return 1.0
    closing = DRAIN_LIFETIMES * moved / level
    return closing / 2 if closing <= 1 else 1 - 1 / (2 * closing)


def route_pays(split: Placement, own: float, route: float, group: list[InstanceLoad]) -> bool:
    """Whether a split's route costs the group less than the request's pages are worth. The route runs for the
    request's whole life: every request the group holds then lives longer by route / own a step, holding its pages
    that much longer, so where memory bounds the pool the group serves that share fewer requests; splitting this one
    (to fit it now, or to balance) puts at most its share of the pages the group holds to work. The pages held, not
    the pool: in an idle group a route slows no one else, and splits there cut the latency DCP is for. Balance
    splits are held to it too: those that failed it cost dcp one bisection step at 20 ms on two 80 GB cells of the
    evaluation. A request larger than any instance of the group can only be split."""
    pages = sum(s.page_quota for s in split.shards)
    if pages > max(i.pages_total for i in group):
        return True
    return route * sum(i.pages_committed for i in group) <= own * pages


def route_may_pay(footprint: Footprint, group: list[InstanceLoad], cost: CostModel) -> bool:
    """Whether any split of the request within `group` could pass `route_pays`: priced with the least route a
    split pays (one routed row) against the most own work it could leave (the whole request added to the group's
    slowest instance)."""
    page_size = group[0].page_size
    pages = footprint.pages(page_size)
    if pages > max(i.pages_total for i in group):
        return True
    most_own = max(cost.own_ms(i) for i in group) + cost.kv_token_ms * pages * page_size + cost.home_token_ms
    return cost.route_ms(1) * sum(i.pages_committed for i in group) <= most_own * pages
