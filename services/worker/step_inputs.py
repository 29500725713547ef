"""Turns a step's chunks into the tensors the model reads: token ids, positions, KV slots, attention metadata."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nanocp import kernels
from nanocp.worker.kv_cache import KVCache
from nanocp.worker.model import StepContext
from nanocp.worker.scheduler import Chunk
from nanocp.worker.timing import StepTimer


@dataclass
class StepInputs:
    token_ids: torch.Tensor
    context: StepContext
    sample_rows: torch.Tensor  # rows whose hidden state gives a next-token distribution
    sampling_chunks: list[Chunk]


def prepare_step(chunks: list[Chunk], cache: KVCache, device: str, timer: StepTimer | None = None) -> StepInputs:
    page_size = cache.page_size
    token_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    qo_indptr, page_indptr, kv_lens = [0], [0], []
    page_indices: list[int] = []
    sample_rows: list[int] = []
    for chunk in chunks:
        r, start, end = chunk.request, chunk.request.num_computed, chunk.request.num_computed + chunk.num_tokens
        token_ids.extend(r.tokens[start:end])
        positions.extend(range(start, end))
        slots.extend(r.pages[p // page_size] * page_size + p % page_size for p in range(start, end))
        qo_indptr.append(qo_indptr[-1] + chunk.num_tokens)
        used_pages = -(-end // page_size)
        page_indices.extend(r.pages[:used_pages])
        page_indptr.append(page_indptr[-1] + used_pages)
        kv_lens.append(end)
        if chunk.samples:
            sample_rows.append(qo_indptr[-1] - 1)

    def tensor(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=device)

    meta = kernels.AttentionMetadata(qo_indptr, page_indptr, tensor(page_indices), kv_lens, page_size, causal=True)
    context = StepContext(tensor(positions), tensor(slots), meta, cache.k, cache.v, timer or StepTimer(enabled=False))
    return StepInputs(tensor(token_ids), context, tensor(sample_rows), [c for c in chunks if c.samples])
