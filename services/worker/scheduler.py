"""Continuous batching with chunked prefill: which requests feed how many tokens into the next step.

Decode tokens go first (one per running request), then prefill chunks fill what is left of the per-step token budget,
so a long prompt never stalls the decodes. A waiting request is admitted, in arrival order, once its whole KV
footprint can be committed in the page pool.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from nanocp.worker.kv_cache import PagePool
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
    def __init__(self, pool: PagePool, page_size: int, max_step_tokens: int, max_running: int) -> None:
        self.pool = pool
        self.page_size = page_size
        self.max_step_tokens = max_step_tokens
        self.max_running = max_running
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def schedule(self) -> list[Chunk]:
        budget = self.max_step_tokens
        chunks = [Chunk(r, 1) for r in self.running if not r.prefilling][:budget]
        budget -= len(chunks)
        for r in self.running:
            if budget > 0 and r.prefilling:
                chunks.append(Chunk(r, min(len(r.prompt) - r.num_computed, budget)))
                budget -= chunks[-1].num_tokens
        while budget > 0 and self.waiting and len(self.running) < self.max_running:
            head = self.waiting[0]
            quota = head.footprint_pages(self.page_size)
            if not self.pool.can_commit(quota):
                break
            self.waiting.popleft()
            self.pool.commit(quota)
            head.page_quota = quota
            self.running.append(head)
            chunks.append(Chunk(head, min(len(head.prompt), budget)))
            budget -= chunks[-1].num_tokens
        return chunks

    def allocate_pages(self, chunk: Chunk) -> None:
        """Takes the pages the chunk's tokens need, within the request's committed quota."""
        r = chunk.request
        needed = -(-(r.num_computed + chunk.num_tokens) // self.page_size) - len(r.pages)
        if needed > 0:
            assert len(r.pages) + needed <= r.page_quota, f"request {r.request_id} outgrew its page quota"
            r.pages.extend(self.pool.take(needed))

    def remove(self, request: Request) -> None:
        """Takes a finished or aborted request out and gives its pages and quota back."""
        if request in self.running:
            self.running.remove(request)
            self.pool.release(request.pages, request.page_quota)
            request.pages = []
        else:
            self.waiting.remove(request)
