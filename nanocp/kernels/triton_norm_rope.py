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
    qkv_stride,
    eps,
    HEADS: tl.constexpr,
    KV_HEADS: tl.constexpr,
    DIM: tl.constexpr,
    PDL: tl.constexpr,
):
    await_inputs(PDL)
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)  # query heads first, then key heads: their columns follow each other in qkv
    HALF: tl.constexpr = DIM // 2
    d = tl.arange(0, HALF)
    source = qkv_ptr + token * qkv_stride + head * DIM
    x1 = tl.load(source + d).to(tl.float32)
    x2 = tl.load(source + HALF + d).to(tl.float32)
    scale = tl.rsqrt((tl.sum(x1 * x1, axis=0) + tl.sum(x2 * x2, axis=0)) / DIM + eps)
    is_query = head < HEADS
    w1 = tl.where(is_query, tl.load(q_weight_ptr + d), tl.load(k_weight_ptr + d)).to(tl.float32)
    w2 = tl.where(is_query, tl.load(q_weight_ptr + HALF + d), tl.load(k_weight_ptr + HALF + d)).to(tl.float32)
    x1 = x1 * scale * w1
    x2 = x2 * scale * w2
    position = tl.load(positions_ptr + token)
    cos = tl.load(cos_ptr + position * DIM + d)  # the tables' two halves are equal
    sin = tl.load(sin_ptr + position * DIM + d)
    y1 = x1 * cos - x2 * sin
    y2 = x2 * cos + x1 * sin
    q_out = q_ptr + (token * HEADS + head) * DIM
    k_out = k_ptr + (token * KV_HEADS + head - HEADS) * DIM
    tl.store(q_out + d, y1.to(q_ptr.dtype.element_ty), mask=is_query)
    tl.store(q_out + HALF + d, y2.to(q_ptr.dtype.element_ty), mask=is_query)
    tl.store(k_out + d, y1.to(k_ptr.dtype.element_ty), mask=head >= HEADS)
    tl.store(k_out + HALF + d, y2.to(k_ptr.dtype.element_ty), mask=head >= HEADS)


def qk_norm_rope_into(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    weights: tuple[torch.Tensor, torch.Tensor],
    tables: tuple[torch.Tensor, torch.Tensor],
    eps: float,
    out: tuple[torch.Tensor, torch.Tensor],
) -> None:
    """kernels.qk_norm_rope's q and k on CUDA, written into `out`: q (tokens, heads, dim) and k (tokens, kv_heads,
    dim), contiguous. qkv (tokens, (heads + 2 kv_heads) * dim); weights the q and k norms'; tables cos and sin, the
    float32 (positions, dim) tables."""
    q, k = out
    tokens, heads, dim = q.shape
    if qkv.stride(1) != 1:  # the kernel reads each row's columns contiguous
        qkv = qkv.contiguous()
    if tokens:
        _qk_norm_rope_kernel[(tokens, heads + k.shape[1])](
            qkv, positions, *weights, *tables, q, k, qkv.stride(0), eps, heads, k.shape[1], dim, **launch_options(qkv)
        )
