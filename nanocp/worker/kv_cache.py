"""The paged KV cache: one tensor of pages per layer, a pool that hands pages out, and the shards held here.

A request commits a page quota for its whole footprint when it is admitted and takes pages from the pool lazily,
as tokens are written. So a committed quota is always backed by free pages and a step never runs out of memory.

A request of CP degree k has k shards (nanocp.placement.Shard) on k distinct instances, in position order; the last
one, the tail, takes the new tokens. Every instance keeps a ShardStore of the shards it holds, of its own requests
and of others', keyed by (request key, shard index), with pages taken lazily within each shard's quota. The router is
the only allocator of quotas, so a quota is always backed by free pages on its holder.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from nanocp.model_config import ModelConfig


class OverCommit(RuntimeError):
    """Pages or quota asked beyond what the pool holds: a placement no honest allocator made (the router counts every
    quota it grants), refused rather than corrupting another request's pages."""


class PagePool:
    def __init__(self, num_pages: int) -> None:
        self.num_pages = num_pages
        self._free = list(range(num_pages - 1, -1, -1))
        self.committed = 0

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_in_use(self) -> int:
        return self.num_pages - len(self._free)

    def can_commit(self, pages: int) -> bool:
        return self.committed + pages <= self.num_pages

    def commit(self, pages: int) -> None:
        if not self.can_commit(pages):
            raise OverCommit(
                f"a quota of {pages} pages exceeds the {self.num_pages - self.committed} uncommitted pages of "
                f"this instance's {self.num_pages}"
            )
        self.committed += pages

    def take(self, count: int) -> list[int]:
        if count > len(self._free):
            raise OverCommit(f"{count} pages taken with only {len(self._free)} free")
        taken = self._free[len(self._free) - count :]
        del self._free[len(self._free) - count :]
        return taken

    def release(self, pages: list[int], quota: int) -> None:
        self._free.extend(pages)
        self.committed -= quota


class KVCache:
    """Keys and values of every layer: (layers, pages, page_size, kv_heads, head_dim) each."""

    def __init__(self, model: ModelConfig, num_pages: int, page_size: int, dtype: torch.dtype, device: str) -> None:
        shape = (model.num_layers, num_pages, page_size, model.num_kv_heads, model.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.page_size = page_size
        self.pool = PagePool(num_pages)


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
        shard = self._held.get(key, {}).get(index, HeldShard(0))
        if quota > shard.quota:
            self.pool.commit(quota - shard.quota)  # first, so a refused quota leaves nothing behind
            shard.quota = quota
        return self._held.setdefault(key, {}).setdefault(index, shard)

    def quota(self, key: int, index: int) -> int:
        """The quota committed here for the shard so far (0: not opened)."""
        held = self._held.get(key, {}).get(index)
        return held.quota if held is not None else 0

    def pages_for(self, key: int, index: int, tokens: int) -> list[int]:
        """The shard's pages covering its first `tokens` positions, taking new pages as needed."""
        shard = self._held[key][index]
        used = -(-tokens // self.page_size)
        if used > len(shard.pages):
            if used > shard.quota:
                raise OverCommit(f"shard {index} of request {key} outgrew its quota of {shard.quota} pages")
            shard.pages.extend(self.pool.take(used - len(shard.pages)))
        return shard.pages[:used]

    def slots(self, key: int, index: int, first: int, count: int) -> list[int]:
        """Flat KV slots of shard-local positions first .. first + count - 1 (their pages must exist)."""
        pages, size = self._held[key][index].pages, self.page_size
        slots: list[int] = []
        position, end = first, first + count
        while position < end:  # a run of slots a page: a prefill chunk's 16K slots in 1K steps, not 16K
            page, offset = divmod(position, size)
            run = min(size - offset, end - position)
            start = pages[page] * size + offset
            slots.extend(range(start, start + run))
            position += run
        return slots

    def free(self, key: int) -> None:
        """Gives back every shard of the request held here (none is fine)."""
        for shard in self._held.pop(key, {}).values():
            self.pool.release(shard.pages, shard.quota)
