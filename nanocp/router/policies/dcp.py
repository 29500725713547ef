"""`dcp`: each request at the CP degree its KV footprint needs, placed for dual balance.

- Degree: at least the smallest k whose shards stay within the per-shard token target (so no instance's attention
  grows with one long request), at most max_degree and the group's size. Larger degrees are candidates too.
- Home: the instance with the fewest home requests (MoE balance), ties to the most free KV. Its KV may live elsewhere.
- Shards: on the home when it has room, then on instances of the home's topology domain, then on the others, each
  time the one with the most free KV (KV balance); even shares of the footprint.
- Choice: among the candidate degrees, the placement that minimises the predicted step time of the group's slowest
  instance (nanocp.router.cost), which also charges CP for the rows it routes. Ties go to the smaller degree.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

from nanocp.placement import Footprint, Placement
from nanocp.router.cost import CostModel, with_placement
from nanocp.router.placement import InstanceLoad, add_shard, contiguous_shards, even_split, grow_tail
from nanocp.router.policies.static import pick_home


class DCPPolicy:
    name = "dcp"

    def __init__(self, shard_tokens: int = 4096, max_degree: int = 8, cost: CostModel | None = None) -> None:
        if shard_tokens < 1 or max_degree < 1:
            raise ValueError(f"need shard_tokens >= 1 and max_degree >= 1, got {shard_tokens} and {max_degree}")
        self.shard_tokens = shard_tokens
        self.max_degree = max_degree
        self.cost = cost or CostModel()

    def place(self, footprint: Footprint, instances: list[InstanceLoad]) -> Placement | None:
        home = pick_home(instances)
        if home is None:
            return None
        group = [i for i in instances if i.group == home.group]
        slowest_ms = self.cost.scorer(group)
        candidates = ((slowest_ms(p), p.cp_degree, p) for p in self._candidates(footprint, home, group))
        best = min(candidates, key=lambda c: c[:2], default=None)
        return best[2] if best is not None else None

    def _candidates(self, footprint: Footprint, home: InstanceLoad, group: list[InstanceLoad]) -> Iterator[Placement]:
        pages = footprint.pages(home.page_size)
        most = min(self.max_degree, len(group), pages)  # a shard holds at least one page
        fewest = min(math.ceil(pages * home.page_size / self.shard_tokens), most)
        others = sorted(
            (i for i in group if i is not home), key=lambda i: (i.domain != home.domain, -i.pages_free, i.id)
        )
        for degree in range(fewest, most + 1):
            shares = even_split(pages, degree)
            holders = ([home] if home.pages_free >= shares[0] else []) + others
            holders = holders[:degree]
            if len(holders) == degree and all(n <= h.pages_free for h, n in zip(holders, shares, strict=True)):
                yield Placement(home.id, contiguous_shards(footprint, holders, shares))

    def grow(self, placement: Placement, pages: int, instances: list[InstanceLoad]) -> Placement | None:
        """A larger tail while it stays within the shard target, else one more shard on the group's instance with
        the most free KV (home's domain first); when both are possible, whichever predicts the faster slowest
        instance. Past the degree cap, or with no other instance free, the tail grows beyond the target."""
        home = next((i for i in instances if i.id == placement.home), None)
        if home is None:
            return None
        group = [i for i in instances if i.group == home.group]
        holders = {s.instance for s in placement.shards}
        new_shard = None
        if placement.cp_degree < self.max_degree:
            others = [i for i in group if i.id not in holders and i.pages_free >= pages]
            best = min(others, key=lambda i: (i.domain != home.domain, -i.pages_free, i.id), default=None)
            new_shard = add_shard(placement, pages, best) if best is not None else None
        tail_tokens = (placement.shards[-1].page_quota + pages) * home.page_size
        larger_tail = grow_tail(placement, pages, group) if tail_tokens <= self.shard_tokens or not new_shard else None
        candidates = [new_shard, larger_tail]
        # Score each candidate whole, against the loads without the placement it replaces.
        slowest_ms = self.cost.scorer([with_placement(placement, i, -1) for i in group])
        scored = [(slowest_ms(c), c.cp_degree, c) for c in candidates if c is not None]
        return min(scored, key=lambda s: s[:2])[2] if scored else None
