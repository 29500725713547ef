"""The shards an instance holds: of its own requests and of others', with their pages.

A request of CP degree k has k shards (nanocp.placement.Shard) on k distinct instances, in position order; the last
one, the tail, takes the new tokens. Every instance keeps a ShardStore of the shards it holds, keyed by (request
key, shard index), with pages taken lazily within each shard's quota. The router is the only allocator of quotas, so
a quota is always backed by free pages on its holder.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from nanocp.worker.kv_cache import PagePool


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
