"""A request as the simulator follows it from arrival to its end: its outcome so far, what the router sees of it
(the footprint), and where its shards are, as instance indices and position ranges."""

from __future__ import annotations

from dataclasses import dataclass, field

from nanocp.placement import Footprint, Placement, Shard
from nanocp.sim.metrics import RequestOutcome


@dataclass(eq=False)
class LiveRequest:
    outcome: RequestOutcome
    footprint: Footprint
    index: int  # in arrival order
    placement: Placement | None = None
    home: int = 0
    holders: list[int] = field(default_factory=list)  # instance of each shard, in position order
    starts: list[int] = field(default_factory=list)
    ends: list[int] = field(default_factory=list)
    computed: int = 0  # prompt tokens in the KV cache
    s0: int = 0  # its first decode step
    shard: int = 0  # the shard its next token goes to
    version: int = 0  # events of older versions are stale

    @property
    def prompt(self) -> int:
        return self.outcome.prompt_tokens

    @property
    def output(self) -> int:
        return self.outcome.output_tokens

    @property
    def shards(self) -> list[Shard]:
        assert self.placement is not None, "only a placed request has shards"
        return self.placement.shards

    def last_step(self) -> int:
        return self.s0 + self.output - 2

    def place(self, placement: Placement, index: dict[str, int], page_size: int) -> None:
        """Takes the placement (its first, or a grown one); `index` numbers the instances."""
        self.placement = placement
        self.home = index[placement.home]
        self.holders = [index[s.instance] for s in placement.shards]
        self.starts = [s.start for s in placement.shards]
        self.ends = [s.start + s.page_quota * page_size for s in placement.shards]
        self.outcome.cp_degree = placement.cp_degree

    def shard_at(self, position: int) -> int:
        """Index of the shard that holds `position`."""
        return next(j for j, end in enumerate(self.ends) if end > position)
