"""The attention block's per-head work on CUDA in one launch: split the fused QKV projection, RMS-normalise each
query and key head (Qwen3's q_norm, k_norm), rotate both by their token's position (NeoX halves), and write q and k
contiguous. Eager torch spends about eighteen small kernels a layer on it (views, casts, norms, the rotation's cat,
products and sums); FlashInfer's fused QK-norm + RoPE + append kernel ships for (64, 8) and (8, 1) heads only, not
Qwen3-30B-A3B's (32, 4). Arithmetic in float32, one rounding at the end.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nanocp.kernels.triton_pdl import await_inputs, launch_options


# Heads a program, by the launch's tokens. One head a program gives a one-token step the most programs in flight; from
# tens of tokens that becomes waves of tiny programs: one call storing K, V took 17.4 us at 256 tokens with one head a
# program against 7.5 with 8, 8.1 against 6.3 (4 heads) at 64, and 795 against 109 us at a 16K-token prefill chunk
# (H200, bench/profile_prefill_gpu.py's sweep, results/profile_prefill_gpu.json); at one token 5.5 against 5.9.
def head_block_for(tokens: int) -> int:
    if tokens <= 8:
        return 1
    return 4 if tokens <= 128 else 8


@triton.jit
def _qk_norm_rope_kernel(  # type: ignore[no-untyped-def]
    qkv_ptr,
    positions_ptr,
    q_weight_ptr,
    k_weight_ptr,
    cos_ptr,
    sin_ptr,
    q_ptr,
    k_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_ptr,
    qkv_stride,
    eps,
    HEADS: tl.constexpr,
    KV_HEADS: tl.constexpr,
    DIM: tl.constexpr,
    STORE: tl.constexpr,
    HEAD_BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):
    await_inputs(PDL)
    token = tl.program_id(0).to(tl.int64)
    # HEAD_BLOCK heads of one token: query heads, key heads, then (storing) value heads, as their columns follow in qkv
    head = tl.program_id(1) * HEAD_BLOCK + tl.arange(0, HEAD_BLOCK)[:, None]
    HALF: tl.constexpr = DIM // 2
    d = tl.arange(0, HALF)[None, :]
    live = head < HEADS + KV_HEADS
    if STORE:
        live = head < HEADS + 2 * KV_HEADS
    source = qkv_ptr + token * qkv_stride + head * DIM
    x1 = tl.load(source + d, mask=live)
    x2 = tl.load(source + HALF + d, mask=live)
    is_query = head < HEADS
    is_key = (head >= HEADS) & (head < HEADS + KV_HEADS)
    if STORE:  # a value head (past the keys) is stored as it is, its rotated values left unwritten
        slot = tl.load(slot_ptr + token).to(tl.int64)  # -1: K, V not kept here (a remote tail, or padding)
        cached = slot * (KV_HEADS * DIM) + (head - HEADS) % KV_HEADS * DIM
        is_value = live & (head >= HEADS + KV_HEADS) & (slot >= 0)
        tl.store(v_cache_ptr + cached + d, x1, mask=is_value)
        tl.store(v_cache_ptr + cached + HALF + d, x2, mask=is_value)
    x1 = x1.to(tl.float32)
    x2 = x2.to(tl.float32)
    scale = tl.rsqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1))[:, None] / DIM + eps)
    w1 = tl.where(is_query, tl.load(q_weight_ptr + d), tl.load(k_weight_ptr + d)).to(tl.float32)
    w2 = tl.where(is_query, tl.load(q_weight_ptr + HALF + d), tl.load(k_weight_ptr + HALF + d)).to(tl.float32)
    x1 = x1 * scale * w1
    x2 = x2 * scale * w2
    position = tl.load(positions_ptr + token)
    cos = tl.load(cos_ptr + position * DIM + d)  # the tables' two halves are equal
    sin = tl.load(sin_ptr + position * DIM + d)
    y1 = (x1 * cos - x2 * sin).to(q_ptr.dtype.element_ty)
    y2 = (x2 * cos + x1 * sin).to(q_ptr.dtype.element_ty)
    q_out = q_ptr + (token * HEADS + head) * DIM
    k_out = k_ptr + (token * KV_HEADS + head - HEADS) * DIM
    tl.store(q_out + d, y1, mask=is_query)
    tl.store(q_out + HALF + d, y2, mask=is_query)
    tl.store(k_out + d, y1, mask=is_key)
    tl.store(k_out + HALF + d, y2, mask=is_key)
    if STORE:
        tl.store(k_cache_ptr + cached + d, y1, mask=is_key & (slot >= 0))
        tl.store(k_cache_ptr + cached + HALF + d, y2, mask=is_key & (slot >= 0))


def qk_norm_rope_into(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    weights: tuple[torch.Tensor, torch.Tensor],
    tables: tuple[torch.Tensor, torch.Tensor],
    eps: float,
    out: tuple[torch.Tensor, torch.Tensor],
    store: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    head_block: int | None = None,
) -> None:
    """kernels.qk_norm_rope's q and k on CUDA, written into `out`: q (tokens, heads, dim) and k (tokens, kv_heads,
    dim), contiguous. qkv (tokens, (heads + 2 kv_heads) * dim); weights the q and k norms'; tables cos and sin, the
    float32 (positions, dim) tables. store: (k_cache, v_cache, slots) to also write each token's K and V into its
    slot of the paged caches (pages, page_size, kv_heads, dim) contiguous, as kernels.store_kv does (slot -1:
    not kept), in the same launch. head_block: heads a program (a power of two; default by the token count)."""
    q, k = out
    tokens, heads, dim = q.shape
    kv_heads = k.shape[1]
    if qkv.stride(1) != 1:  # the kernel reads each row's columns contiguous
        qkv = qkv.contiguous()
    if store is not None and not (store[0].is_contiguous() and store[1].is_contiguous()):
        raise ValueError("storing K, V needs contiguous caches")
    k_cache, v_cache, slots = store if store is not None else (k, k, positions)  # unread without STORE
    block = head_block or head_block_for(tokens)
    if tokens:
        _qk_norm_rope_kernel[(tokens, triton.cdiv(heads + kv_heads * (1 if store is None else 2), block))](
            qkv,
            positions,
            *weights,
            *tables,
            q,
            k,
            k_cache,
            v_cache,
            slots,
            qkv.stride(0),
            eps,
            heads,
            kv_heads,
            dim,
            store is not None,
            block,
            **launch_options(qkv),
        )
