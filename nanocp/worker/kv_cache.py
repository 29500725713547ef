"""The paged KV cache: one tensor of pages per layer and a pool that hands pages out.

A request commits a page quota for its whole footprint when it is admitted and takes pages from the pool lazily,
as tokens are written. So a committed quota is always backed by free pages and a step never runs out of memory.
"""

from __future__ import annotations

import torch

from nanocp.model_config import ModelConfig


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
        assert self.can_commit(pages), "a quota beyond the pool was committed"
        self.committed += pages

    def take(self, count: int) -> list[int]:
        assert count <= len(self._free), "pages taken beyond committed quotas"
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
