"""Where a request runs, and the interface every placement policy implements.

A policy sees a request's footprint and the ready instances' loads as the router counts them, and answers with a
Placement, or None when nothing fits now (the request then waits for pages to be released).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

from nanocp.v1 import common_pb2


@dataclass(frozen=True)
class Shard:
    instance: str
    start: int  # first token position the shard covers
    page_quota: int  # pages its holder reserves for it


@dataclass(frozen=True)
class Placement:
    home: str
    shards: list[Shard]

    @property
    def cp_degree(self) -> int:
        return len(self.shards)

    def to_proto(self) -> common_pb2.Placement:
        return common_pb2.Placement(
            home=self.home,
            shards=[common_pb2.Shard(instance=s.instance, start=s.start, page_quota=s.page_quota) for s in self.shards],
        )

    @classmethod
    def from_proto(cls, proto: common_pb2.Placement) -> Placement:
        return cls(proto.home, [Shard(s.instance, s.start, s.page_quota) for s in proto.shards])


@dataclass(frozen=True)
class Footprint:
    """What a request may occupy: its prompt and every token it may generate."""

    prompt_tokens: int
    max_tokens: int

    @property
    def tokens(self) -> int:
        # The last sampled token never enters the KV cache.
        return self.prompt_tokens + self.max_tokens - 1

    def pages(self, page_size: int) -> int:
        return math.ceil(self.tokens / page_size)


@dataclass(frozen=True)
class InstanceLoad:
    """One ready instance as the router counts it (its own grants, not the worker's reports)."""

    id: str
    page_size: int
    pages_total: int
    pages_committed: int = 0
    home_batch: int = 0

    @property
    def pages_free(self) -> int:
        return self.pages_total - self.pages_committed


class PlacementPolicy(Protocol):
    name: str

    def place(self, footprint: Footprint, instances: list[InstanceLoad]) -> Placement | None:
        """A placement whose quotas fit the instances' free pages, or None when nothing fits now."""
        ...
