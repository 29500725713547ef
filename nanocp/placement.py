"""Where a request's KV lives and how much room it may need: the arithmetic the router, the SDK, the simulator and
the worker share.

A request of CP degree k has k shards on k distinct instances of its home's decode group, in position order; the
last one, the tail, takes the new tokens. Its footprint is every position it may cache. With a reservation
(--reserve-output-tokens) it is placed for its prompt and that many new tokens, and its home asks for more
(`asks_to_grow`) while `GROW_AHEAD_PAGES` pages of its tail are still free, so the answer arrives before a decode
step must wait for it; the placement then grows by the next reservation, or by what the request may still need if
that is less (`growth_pages`).

Standard library only: importing it pulls neither torch nor protobuf (the wire conversions are in nanocp.wire).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# A request's home asks for its placement to grow while this many pages of its tail are still free.
GROW_AHEAD_PAGES = 2


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


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
        return _ceil_div(self.tokens, page_size)

    def reserved(self, reserve: int | None) -> Footprint:
        """What the request is first placed for: its prompt and at most `reserve` new tokens (None: all of them)."""
        return self if reserve is None else Footprint(self.prompt_tokens, min(self.max_tokens, reserve))


@dataclass(frozen=True)
class Shard:
    rank: int  # the holder's rank in the home's decode group
    start: int  # first token position the shard covers
    page_quota: int  # pages its holder reserves for it
    instance: str = ""  # the holder's instance id, as the router names it (the engine needs only the rank)


@dataclass(frozen=True)
class Placement:
    home: str
    shards: list[Shard]

    @property
    def cp_degree(self) -> int:
        return len(self.shards)

    @property
    def routed_rows(self) -> dict[str, int]:
        """Query rows routed per decode step, by instance: one out and back per remote shard, at both ends."""
        rows: dict[str, int] = {}
        for shard in self.shards:
            if shard.instance != self.home:
                rows[self.home] = rows.get(self.home, 0) + 1
                rows[shard.instance] = rows.get(shard.instance, 0) + 1
        return rows


def covered_tokens(shards: Sequence[Shard], page_size: int) -> int:
    """Positions the shards' quotas cover: up to the end of the tail's quota."""
    tail = shards[-1]
    return tail.start + tail.page_quota * page_size


def shard_ends(shards: Sequence[Shard], page_size: int) -> list[int]:
    """One past each shard's last position: the next shard's start, or the tail's quota for the tail."""
    return [s.start for s in shards[1:]] + [covered_tokens(shards, page_size)]


def check_shards(shards: Sequence[Shard], group_size: int, page_size: int) -> str | None:
    """Why a placement's shards are unusable by a group of `group_size`, or None."""
    if not shards or shards[0].start != 0:
        return "the first shard must start at position 0"
    ranks = [s.rank for s in shards]
    if len(set(ranks)) != len(ranks):
        return f"shards must be on distinct instances, got ranks {ranks}"
    if any(not 0 <= r < group_size for r in ranks):
        return f"shard holders {ranks} are outside the group of {group_size}"
    for shard, end in zip(shards, shard_ends(shards, page_size), strict=True):
        if shard.page_quota < 1 or end - shard.start > shard.page_quota * page_size or end <= shard.start:
            return f"shard at {shard.start} on rank {shard.rank} does not fit its quota of {shard.page_quota} pages"
    return None


def check_growth(old: Sequence[Shard], new: Sequence[Shard]) -> str | None:
    """Why `new` is not `old` grown without moving KV (the tail's quota larger, shards added after it), or None."""
    if len(new) < len(old) or new[: len(old) - 1] != old[:-1]:
        return "a grown placement keeps every shard but the tail as it was"
    tail, kept = old[-1], new[len(old) - 1]
    if (kept.rank, kept.start) != (tail.rank, tail.start) or kept.page_quota < tail.page_quota:
        return "a grown placement keeps the tail where it was, with at least its quota"
    return None


def asks_to_grow(shards: Sequence[Shard], footprint: Footprint, tokens: int, page_size: int) -> bool:
    """Whether a request holding `tokens` tokens (prompt and output so far) asks its placement to grow: it may still
    need positions past its tail and fewer than GROW_AHEAD_PAGES pages of the tail are left."""
    covered = covered_tokens(shards, page_size)
    return covered < footprint.tokens and covered - tokens < GROW_AHEAD_PAGES * page_size


def growth_pages(shards: Sequence[Shard], footprint: Footprint, page_size: int, reserve: int | None) -> int:
    """Pages to add: the next `reserve` tokens, or what the footprint still lacks if that is less."""
    missing = footprint.tokens - covered_tokens(shards, page_size)
    return _ceil_div(min(missing, reserve or missing), page_size)
