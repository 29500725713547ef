"""Paged attention over a set of pages returning (output, log-sum-exp), and the merge of partial states.

A request's keys and values live in fixed-size pages of a pool; a query segment attends over the pages it names.
Splitting those pages into parts, attending each part, and merging the partial states gives the unsplit result:
this is what context parallelism relies on.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch

from nanocp.kernels.moe import fused

FLASHINFER_HEAD_DIMS = (64, 128, 256)


@dataclass(frozen=True)
class AttentionMetadata:
    """One step's query segments and the pages each one reads; built once a step and shared by every layer.

    Segment b owns query rows qo_indptr[b]:qo_indptr[b+1] and reads the first kv_lens[b] token slots of pages
    page_indices[page_indptr[b]:page_indptr[b+1]]. With causal, a segment's queries are the last rows of its KV.
    """

    qo_indptr: list[int]
    page_indptr: list[int]
    page_indices: torch.Tensor
    kv_lens: list[int]
    page_size: int
    causal: bool = True

    @property
    def num_segments(self) -> int:
        return len(self.kv_lens)

    @cached_property
    def groups(self) -> list[_SegmentGroup]:
        """The plan: segments batched together, worked out once a step on first use and reused by every layer.

        Single-row segments (decodes) form one group, the hot path; each multi-row segment (a prefill chunk, or
        several routed queries of one request) is a group of its own.
        """
        singles: list[int] = []
        multis: list[int] = []
        for b in range(self.num_segments):
            rows = self.qo_indptr[b + 1] - self.qo_indptr[b]
            if rows > 0 and self.kv_lens[b] > 0:
                (singles if rows == 1 else multis).append(b)
        groups = [self._group(singles, causal=False)] if singles else []
        return groups + [self._group([b], causal=self.causal) for b in multis]

    @cached_property
    def backend_plans(self) -> dict[tuple[Any, ...], Any]:
        """Plans a GPU backend makes for this step, keyed by what they depend on besides the metadata (head counts,
        dtypes, scale); made on the first layer's call and reused by the others."""
        return {}

    def _group(self, segments: list[int], causal: bool) -> _SegmentGroup:
        device = self.page_indices.device
        n = self.qo_indptr[segments[0] + 1] - self.qo_indptr[segments[0]]
        rows = [r for b in segments for r in range(self.qo_indptr[b], self.qo_indptr[b + 1])]
        page_lists = [self.page_indices[self.page_indptr[b] : self.page_indptr[b + 1]] for b in segments]
        table = torch.nn.utils.rnn.pad_sequence(page_lists, batch_first=True)  # padding reads page 0, masked below
        kv_lens = torch.tensor([self.kv_lens[b] for b in segments], device=device)
        key_pos = torch.arange(table.shape[1] * self.page_size, device=device)
        allowed = key_pos[None, None, :] < kv_lens[:, None, None]  # (segments, 1, keys)
        if causal:
            # Query i of a segment sits at position kv_len - n + i and sees keys up to it.
            query_pos = kv_lens[:, None] - n + torch.arange(n, device=device)[None, :]
            allowed = allowed & (key_pos[None, None, :] <= query_pos[:, :, None])
        return _SegmentGroup(torch.tensor(rows, device=device), table, allowed, n)


@dataclass(frozen=True)
class _SegmentGroup:
    rows: torch.Tensor  # query rows of the group, segment by segment
    table: torch.Tensor  # (segments, pages) padded page table
    allowed: torch.Tensor  # (segments, 1 or rows per segment, keys) which keys each query sees
    rows_per_segment: int


def store_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Writes token rows into the pool at flat slots (page * page_size + offset); slot -1 is a padding row."""
    if k_cache.is_cuda:
        from nanocp.kernels import triton_ops  # imports triton, which only GPU machines have

        triton_ops.store_kv(k_cache, v_cache, k, v, slot_mapping)
    else:
        reference_store_kv(k_cache, v_cache, k, v, slot_mapping)


def reference_store_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """The torch version of store_kv (its boolean indexing waits for the device, so it can't run in a CUDA graph)."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, k[keep])
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, v[keep])


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    own_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q: (rows, heads, dim); caches: (pages, page_size, kv_heads, dim).

    Returns o (rows, heads, dim) in q's dtype and lse (rows, heads) in float32. A segment with no keys yields
    o = 0 and lse = -inf, which merges as neutral.

    own_kv: the rows' own K and V (rows, kv_heads, dim), row for row, already stored in their pages: a backend may
    read a segment's keys from them where they are all its rows' own (a prompt's first chunk). The same result.
    """
    # What FlashInfer runs (its prefill kernels have no configuration for smaller heads); the rest takes the reference.
    if fused(q) and q.shape[-1] in FLASHINFER_HEAD_DIMS:
        from nanocp.kernels import flashinfer_attention

        return flashinfer_attention.paged_attention(q, k_cache, v_cache, meta, scale, own_kv)
    return reference_paged_attention(q, k_cache, v_cache, meta, scale)


def reference_paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch version of paged_attention: float32 arithmetic on any device, the oracle for the GPU kernels."""
    num_heads, dim = q.shape[1:]
    num_kv_heads = k_cache.shape[2]
    group_size = num_heads // num_kv_heads
    out = torch.zeros_like(q)
    lse = torch.full(q.shape[:2], float("-inf"), dtype=torch.float32, device=q.device)
    for g in meta.groups:
        segments, n = g.table.shape[0], g.rows_per_segment
        keys = k_cache[g.table].view(segments, -1, num_kv_heads, dim).float()
        values = v_cache[g.table].view(segments, -1, num_kv_heads, dim).float()
        queries = q[g.rows].float().view(segments, n, num_kv_heads, group_size, dim)
        scores = torch.einsum("snhgd,skhd->shgnk", queries, keys) * scale
        scores = scores.masked_fill(~g.allowed[:, None, None, :, :], float("-inf"))
        group_lse = torch.logsumexp(scores, dim=-1)  # (segments, kv_heads, group, n)
        probs = torch.exp(scores - group_lse[..., None])
        group_out = torch.einsum("shgnk,skhd->snhgd", probs, values)
        out[g.rows] = group_out.reshape(-1, num_heads, dim).to(q.dtype)
        lse[g.rows] = group_lse.permute(0, 3, 1, 2).reshape(-1, num_heads)
    return out, lse


def merge_states(outputs: torch.Tensor, lses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merges partial attention states over disjoint key sets.

    outputs: (parts, rows, heads, dim); lses: (parts, rows, heads), natural log. Parts with lse = -inf count as
    empty. lse = log sum_j exp(lse_j); o = sum_j exp(lse_j - lse) o_j.
    """
    if outputs.is_cuda:
        from nanocp.kernels import triton_ops

        return triton_ops.merge_states(outputs, lses)
    return reference_merge_states(outputs, lses)


def reference_merge_states(outputs: torch.Tensor, lses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch version of merge_states."""
    lse = torch.logsumexp(lses, dim=0)
    weights = torch.exp(lses - lse[None]).nan_to_num(0.0)  # all parts empty: -inf - -inf
    merged = (weights[..., None] * outputs.float()).sum(dim=0)
    return merged.to(outputs.dtype), lse
