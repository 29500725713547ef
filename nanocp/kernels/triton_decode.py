"""Decode attention of the one-row graph bucket: split-KV in two Triton launches (`SplitDecode`), in place of
FlashInfer's graph decode.

Why: at one row FlashInfer's tensor-core decode and its merge take 10-13 us a layer for contexts of 16 to 1K tokens,
where the bytes take well under a microsecond, and its kernels let the next one start only when they end. Here
launch 1 gives each (row, KV head, split) program an even share of the row's tokens (its page range found on the
device, so a graph's fixed grid serves any context) and writes a partial (o, log-sum-exp) for the KV head's query
heads; launch 2 merges each head's partials in a fixed order. Both launch with PDL and let the next kernel be
scheduled once their wait returns (so the o projection reads its weight while they run); the page table, written
by the host before the replay, is read before the wait.

Measured on an H200 (bench/decode_kernels_gpu.py --parts triton_decode, decode_kernels_gpu_triton_decode_h200.json),
us a layer, FlashInfer against this with 128 splits (64): one row of 16 tokens 10.3 against 6.2 (5.4), 1K 12.6
against 6.7 (6.2), 8K 15.2 against 9.7 (10.7), 64K 45.8 against 42.5 (56.3), so one row takes 128. More rows gain
less and lose at long contexts: 2 x 1K 13.1 against 9.8 but 2 x 64K 75.4 against 80.6, 8 x 1K 14.6 against 13.1;
with every bucket up to 8 rows on it, the engine's 8 x 64K step took 21.3 ms against 19.7
(gpu_decode_step_h200_triton_decode_8rows.json), so only the one-row bucket uses it.

Layouts as the engine's: q (rows, heads, dim); caches (pages, page_size, kv_heads, dim); page_indptr (rows + 1,) and
page_indices int32 (FlashInfer's CSR table); kv_lens (rows,) int32 tokens. Returns o (rows, heads, dim) in q's dtype
and the natural-log lse (rows, heads) in float32.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import triton
import triton.language as tl

from nanocp.kernels.flashinfer_attention import page_table, pinned
from nanocp.kernels.triton_pdl import await_inputs, launch_options

if TYPE_CHECKING:
    from nanocp.kernels.attention import AttentionMetadata

LOG2E = 1.4426950408889634
TOKENS = 64  # keys a program reads per iteration
MAX_ROWS = 1  # the largest bucket it serves (see the module's docstring)
MAX_SPLITS = 128


def splits_for(rows: int, kv_heads: int, sms: int, most: int = MAX_SPLITS) -> int:
    """Splits a row's keys into enough programs to fill the device twice over (a power of two, at most `most`)."""
    return max(1, min(most, triton.next_power_of_2(math.ceil(2 * sms / (rows * kv_heads)))))


@triton.jit
def _partials_kernel(  # type: ignore[no-untyped-def]
    q_ptr,
    k_ptr,
    v_ptr,
    indptr_ptr,
    indices_ptr,
    kv_lens_ptr,
    o_ptr,
    lse_ptr,
    scale_log2,
    page_stride,
    token_stride,
    KV_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    GROUP_BLOCK: tl.constexpr,
    DIM: tl.constexpr,
    PAGE: tl.constexpr,
    SPLITS: tl.constexpr,
    TOKENS: tl.constexpr,
    PDL: tl.constexpr,
):
    row = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    # The page table is the host's, copied in before the replay: read before waiting for the kernel before.
    page_start = tl.load(indptr_ptr + row)
    kv_len = tl.load(kv_lens_ptr + row)
    per_split = ((kv_len + SPLITS - 1) // SPLITS + TOKENS - 1) // TOKENS * TOKENS  # whole iterations each
    lo = split * per_split
    hi = tl.minimum(lo + per_split, kv_len)
    await_inputs(PDL)
    g = tl.arange(0, GROUP_BLOCK)  # the KV head's query heads, padded to tl.dot's 16 rows
    d = tl.arange(0, DIM)
    heads = kv_head * GROUP + g
    q = tl.load(q_ptr + row * (KV_HEADS * GROUP * DIM) + heads[:, None] * DIM + d[None, :], mask=g[:, None] < GROUP)
    m_i = tl.full((GROUP_BLOCK,), float("-inf"), tl.float32)
    l_i = tl.zeros((GROUP_BLOCK,), tl.float32)
    acc = tl.zeros((GROUP_BLOCK, DIM), tl.float32)
    t = tl.arange(0, TOKENS)
    for step in range(0, per_split // TOKENS):
        start = lo + step * TOKENS
        if start < hi:  # at least one key: the running max stays finite
            pos = start + t
            ok = pos < hi
            page = tl.load(indices_ptr + page_start + pos // PAGE, mask=ok, other=0).to(tl.int64)
            offsets = page * page_stride + (pos % PAGE) * token_stride + kv_head * DIM
            k = tl.load(k_ptr + offsets[:, None] + d[None, :], mask=ok[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k)) * scale_log2
            s = tl.where(ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            p = tl.exp2(s - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(v_ptr + offsets[:, None] + d[None, :], mask=ok[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
    has = l_i > 0  # an empty split (a short row's tail programs) writes o = 0, lse = -inf
    o = tl.where(has[:, None], acc / tl.where(has, l_i, 1.0)[:, None], 0.0)
    lse2 = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
    part = (row * KV_HEADS + kv_head) * SPLITS + split
    # An empty split's o is never read (the merge skips parts with lse = -inf): short rows move few bytes.
    tl.store(o_ptr + (part * GROUP + g[:, None]) * DIM + d[None, :], o, mask=(g[:, None] < GROUP) & has[:, None])
    tl.store(lse_ptr + part * GROUP + g, lse2, mask=g < GROUP)


@triton.jit
def _merge_kernel(  # type: ignore[no-untyped-def]
    o_ptr,
    lse_ptr,
    out_ptr,
    out_lse_ptr,
    KV_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    DIM: tl.constexpr,
    SPLITS: tl.constexpr,
    PDL: tl.constexpr,
):
    await_inputs(PDL)
    row = tl.program_id(0)
    head = tl.program_id(1)
    kv_head = head // GROUP
    g = head % GROUP
    s = tl.arange(0, SPLITS)
    d = tl.arange(0, DIM)
    parts = (row * KV_HEADS + kv_head) * SPLITS + s
    lse2 = tl.load(lse_ptr + parts * GROUP + g)
    top = tl.max(lse2, axis=0)
    top = tl.where(top == float("-inf"), 0.0, top)
    weights = tl.exp2(lse2 - top)
    total = tl.sum(weights, axis=0)
    o = tl.load(
        o_ptr + (parts[:, None] * GROUP + g) * DIM + d[None, :], mask=(lse2 > float("-inf"))[:, None], other=0.0
    )
    merged = tl.sum(o * weights[:, None], axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + (row * KV_HEADS * GROUP + head) * DIM + d, merged.to(out_ptr.dtype.element_ty))
    tl.store(out_lse_ptr + row * KV_HEADS * GROUP + head, (top + tl.log2(total)) * 0.6931471805599453)


def decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_indptr: torch.Tensor,
    page_indices: torch.Tensor,
    kv_lens: torch.Tensor,
    scale: float,
    splits: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every row's attention over its pages: (o, natural-log lse); see the module docstring for the layouts."""
    rows, heads, dim = q.shape
    _, page, kv_heads, _ = k_cache.shape
    group = heads // kv_heads
    partial_o = torch.empty(rows, kv_heads, splits, group, dim, dtype=torch.float32, device=q.device)
    partial_lse = torch.empty(rows, kv_heads, splits, group, dtype=torch.float32, device=q.device)
    out = torch.empty_like(q)
    lse = torch.empty(rows, heads, dtype=torch.float32, device=q.device)
    options = launch_options(q)
    _partials_kernel[(rows, kv_heads, splits)](
        q.contiguous(),
        k_cache,
        v_cache,
        page_indptr,
        page_indices,
        kv_lens,
        partial_o,
        partial_lse,
        scale * LOG2E,
        k_cache.stride(0),
        k_cache.stride(1),
        KV_HEADS=kv_heads,
        GROUP=group,
        GROUP_BLOCK=max(16, triton.next_power_of_2(group)),
        DIM=dim,
        PAGE=page,
        SPLITS=splits,
        TOKENS=TOKENS,
        num_warps=4,
        **options,
    )
    _merge_kernel[(rows, heads)](
        partial_o, partial_lse, out, lse, KV_HEADS=kv_heads, GROUP=group, DIM=dim, SPLITS=splits, **options
    )
    return out, lse


class SplitDecode:
    """GraphDecode's interface (planned on the host before each replay; run or output inside the graph) with the
    split-KV decode above: a graph bucket of `rows` rows, padding rows attending one token of PAD_PAGE."""

    def __init__(self, rows: int, max_pages: int, plan_args: dict[str, Any], device: torch.device) -> None:
        """plan_args as GraphDecode takes them (FlashInfer's plan() arguments)."""
        self.rows = rows
        self.device = device
        self.scale = plan_args["sm_scale"]
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        self.splits = splits_for(rows, plan_args["num_kv_heads"], sms)
        self.page_indptr = torch.zeros(rows + 1, dtype=torch.int32, device=device)
        self.page_indices = torch.zeros(max_pages + rows, dtype=torch.int32, device=device)
        self.kv_lens = torch.ones(rows, dtype=torch.int32, device=device)

    def plan(self, meta: AttentionMetadata | None) -> None:
        """The segments of `meta` (one row each, in row order; None: none) into the tables, padded to the rows."""
        segments = list(range(meta.num_segments)) if meta is not None else []
        padding = self.rows - len(segments)
        indptr, indices, _ = page_table(meta, segments, self.device, padding)
        kv_lens = [meta.kv_lens[b] for b in segments] if meta is not None else []
        self.page_indptr.copy_(indptr, non_blocking=True)
        self.page_indices[: len(indices)].copy_(indices)
        self.kv_lens.copy_(pinned(kv_lens + [1] * padding), non_blocking=True)

    def run(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q: (rows, heads, dim); the output and log-sum-exp (natural log) of every row, padding rows included."""
        return decode(q, k_cache, v_cache, self.page_indptr, self.page_indices, self.kv_lens, self.scale, self.splits)

    def output(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        """run's output alone."""
        return self.run(q, k_cache, v_cache)[0]
