"""Where a request's KV lives: contiguous shards of its positions, each on one instance of the group.

A request of CP degree k has k shards on k distinct instances, in position order; the last one, the tail, takes the
new tokens. Every instance keeps a ShardStore of the shards it holds (of its own requests and of others'), keyed by
(request key, shard index), with pages taken lazily within each shard's quota. The router is the only allocator of
quotas, so a quota is always backed by free pages on its holder.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from nanocp.worker.kv_cache import PagePool


@dataclass(frozen=True)
class ShardSpec:
    holder: int  # rank of the instance holding the shard's pages
    start: int  # first token position the shard covers
    page_quota: int  # pages reserved for it on the holder


def shard_ends(shards: list[ShardSpec], page_size: int) -> list[int]:
    """One past each shard's last position: the next shard's start, or the tail's quota for the tail."""
    return [s.start for s in shards[1:]] + [shards[-1].start + shards[-1].page_quota * page_size]


def check_growth(old: list[ShardSpec], new: list[ShardSpec]) -> str | None:
    """Why `new` is not `old` grown without moving KV (the tail's quota larger, shards added after it), or None."""
    if len(new) < len(old) or new[: len(old) - 1] != old[:-1]:
        return "a grown placement keeps every shard but the tail as it was"
    tail, kept = old[-1], new[len(old) - 1]
    if (kept.holder, kept.start) != (tail.holder, tail.start) or kept.page_quota < tail.page_quota:
        return "a grown placement keeps the tail where it was, with at least its quota"
    return None


def check_shards(shards: list[ShardSpec], group_size: int, page_size: int) -> str | None:
    """Why a placement's shards are unusable, or None."""
    if not shards or shards[0].start != 0:
        return "the first shard must start at position 0"
    holders = [s.holder for s in shards]
    if len(set(holders)) != len(holders):
        return f"shards must be on distinct instances, got ranks {holders}"
    if any(not 0 <= h < group_size for h in holders):
        return f"shard holders {holders} are outside the group of {group_size}"
    for shard, end in zip(shards, shard_ends(shards, page_size), strict=True):
        if shard.page_quota < 1 or end - shard.start > shard.page_quota * page_size or end <= shard.start:
            return f"shard at {shard.start} on rank {shard.holder} does not fit its quota of {shard.page_quota} pages"
    return None


@dataclass
class HeldShard:
    quota: int
    pages: list[int] = field(default_factory=list)


class ShardStore:
    def __init__(self, pool: PagePool, page_size: int) -> None:
        self.pool = pool
        self.page_size = page_size
        self._held: dict[int, dict[int, HeldShard]] = {}  # request key -> shard index -> shard

    def __len__(self) -> int:
        return sum(len(shards) for shards in self._held.values())

    def open(self, key: int, index: int, quota: int) -> HeldShard:
        """The shard, committing its quota the first time it is seen and the difference when the quota grew."""
        shards = self._held.setdefault(key, {})
        shard = shards.setdefault(index, HeldShard(0))
        if quota > shard.quota:
            self.pool.commit(quota - shard.quota)
            shard.quota = quota
        return shard

    def pages_for(self, key: int, index: int, tokens: int) -> list[int]:
        """The shard's pages covering its first `tokens` positions, taking new pages as needed."""
        shard = self._held[key][index]
        used = -(-tokens // self.page_size)
        if used > len(shard.pages):
            assert used <= shard.quota, f"shard {index} of request {key} outgrew its quota of {shard.quota} pages"
            shard.pages.extend(self.pool.take(used - len(shard.pages)))
        return shard.pages[:used]

    def slots(self, key: int, index: int, first: int, count: int) -> list[int]:
        """Flat KV slots of shard-local positions first .. first + count - 1 (their pages must exist)."""
        pages, size = self._held[key][index].pages, self.page_size
        return [pages[p // size] * size + p % size for p in range(first, first + count)]

    def free(self, key: int) -> None:
        """Gives back every shard of the request held here (none is fine)."""
        for shard in self._held.pop(key, {}).values():
            self.pool.release(shard.pages, shard.quota)
