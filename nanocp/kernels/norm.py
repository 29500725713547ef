"""RMS normalisation and the attention block's per-head work: torch on CPU (the reference, transformers'
arithmetic), fused kernels on CUDA (FlashInfer's norm, Triton kernels for add + norm and QK-norm + rotary).

The residual stream is carried beside the hidden states (as vLLM and SGLang do): each norm after the first adds the
previous block's output to the residual and normalises the sum, one kernel on CUDA instead of an add and a norm.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nanocp.kernels.attention import store_kv
from nanocp.kernels.moe import ExpertOutputs, fused


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * x / rms(x) over the last dimension; x (rows, size) or (rows, heads, size)."""
    if fused(x):
        import flashinfer  # GPU machines only

        return flashinfer.norm.rmsnorm(x.contiguous(), weight, eps)
    return reference_rms_norm(x, weight, eps)


def reference_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Normalised in float32, then scaled in x's dtype, as transformers does.
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


def add_rms_norm(
    x: torch.Tensor | ExpertOutputs, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(residual + x), residual + x), x an MoE layer's outputs combined first. On CUDA in place: residual
    becomes the second (and a tensor x the first)."""
    if isinstance(x, ExpertOutputs):
        if not (fused(x.y) and residual.is_contiguous()):
            return add_rms_norm(x.combine(), residual, weight, eps)
        from nanocp.kernels import triton_moe

        return triton_moe.combine_add_rms_norm(*x, residual, weight, eps)
    if fused(x) and x.is_contiguous() and residual.is_contiguous():
        from nanocp.kernels import triton_norm

        return triton_norm.add_rms_norm(x, residual, weight, eps)
    residual = residual + x
    return reference_rms_norm(residual, weight, eps), residual


def qk_norm_rope(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    eps: float,
    heads: int,
    kv_heads: int,
    store: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Splits a fused QKV projection (tokens, (heads + 2 kv_heads) * dim) into q, k, v (tokens, heads, dim); q and k
    RMS-normalised per head (q_weight, k_weight) then rotated by their token's position (NeoX halves; cos, sin the
    float32 (positions, dim) tables). store: (k_cache, v_cache, slots) to write each token's K, V into the paged
    caches as store_kv does (on CUDA in the same launch)."""
    dim = cos.shape[-1]
    v = qkv[:, (heads + kv_heads) * dim :].view(-1, kv_heads, dim)  # a view on both paths
    if fused(qkv):
        from nanocp.kernels import triton_norm_rope

        out = qkv.new_empty(len(qkv), heads, dim), qkv.new_empty(len(qkv), kv_heads, dim)
        triton_norm_rope.qk_norm_rope_into(qkv, positions, (q_weight, k_weight), (cos, sin), eps, out, store)
        return *out, v
    q, k, _ = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    tables = cos[positions].to(qkv.dtype)[:, None, :], sin[positions].to(qkv.dtype)[:, None, :]
    q = _rotate(reference_rms_norm(q.view(-1, heads, dim), q_weight, eps), tables)
    k = _rotate(reference_rms_norm(k.view(-1, kv_heads, dim), k_weight, eps), tables)
    if store is not None:
        k_cache, v_cache, slots = store
        store_kv(k_cache, v_cache, k, v, slots)
    return q, k, v


def _rotate(x: torch.Tensor, tables: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """x: (tokens, heads, dim) rotated by its tokens' positions, as transformers' rotate_half does."""
    cos, sin = tables
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin
