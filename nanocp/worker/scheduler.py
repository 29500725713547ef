"""Continuous batching with chunked prefill: which requests feed how many tokens into the next step.

Decode tokens go first (one per running request), then prefill chunks fill what is left of the per-step token budget,
so a long prompt never stalls the decodes. A chunk never straddles two of its request's shards (its causal mask
assumes its rows are the last of one shard's KV). A waiting request is admitted, in arrival order, once the quotas
of its shards held here can be committed in the page pool (the router has already counted every shard's quota).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from nanocp.placement import shard_ends
from nanocp.worker.kv_cache import ShardStore
from nanocp.worker.request import Request


@dataclass(frozen=True)
class Chunk:
    request: Request
    num_tokens: int  # tokens this step feeds: a prefill chunk, or 1 for a decode

    @property
    def samples(self) -> bool:
        """True when the chunk reaches the request's last token, so the step samples the next one."""
        return self.request.num_computed + self.num_tokens == self.request.num_tokens


class Scheduler:
    def __init__(self, store: ShardStore, rank: int, max_step_tokens: int, max_running: int) -> None:
        self.store = store
        self.rank = rank
        self.max_step_tokens = max_step_tokens
        self.max_running = max_running
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def schedule(self) -> list[Chunk]:
        budget = self.max_step_tokens
        # A decode whose tail is full waits for its placement to grow.
        chunks = [Chunk(r, 1) for r in self.running if r.decodable][:budget]
        budget -= len(chunks)
        for r in self.running:
            if budget > 0 and r.prefilling:
                chunks.append(self._prefill_chunk(r, budget))
                budget -= chunks[-1].num_tokens
        while budget > 0 and self.waiting and len(self.running) < self.max_running:
            head = self.waiting[0]
            local = [(i, s) for i, s in enumerate(head.shards) if s.rank == self.rank]
            if not self.store.pool.can_commit(sum(s.page_quota for _, s in local)):
                break
            self.waiting.popleft()
            for i, shard in local:
                self.store.open(head.key, i, shard.page_quota)
            self.running.append(head)
            chunks.append(self._prefill_chunk(head, budget))
            budget -= chunks[-1].num_tokens
        return chunks

    def _prefill_chunk(self, r: Request, budget: int) -> Chunk:
        shard_end = shard_ends(r.shards, self.store.page_size)[r.shard_at(r.num_computed)]
        return Chunk(r, min(len(r.prompt) - r.num_computed, budget, shard_end - r.num_computed))

    def remove(self, request: Request) -> None:
        """Takes a finished or aborted request out and gives back the pages and quotas of its shards held here."""
        if request in self.running:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        self.store.free(request.key)
