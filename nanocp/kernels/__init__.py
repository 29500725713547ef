"""Attention, merge, norm and MoE ops behind one interface, chosen by the tensors' device: plain torch on CPU (also
the reference the GPU kernels are tested against), FlashInfer, Triton and grouped GEMM on CUDA.

Convention at this interface: log-sum-exp values are natural logarithms (backends in base 2 convert at their edge).
"""

from nanocp.kernels.attention import AttentionMetadata, merge_states, paged_attention, store_kv
from nanocp.kernels.moe import (
    ExpertOutputs,
    TokenRows,
    combine,
    grouped_swiglu,
    grouped_swiglu_by_ends,
    route_topk,
    sort_by_expert,
)
from nanocp.kernels.norm import add_rms_norm, qk_norm_rope, rms_norm

__all__ = [
    "AttentionMetadata",
    "ExpertOutputs",
    "TokenRows",
    "add_rms_norm",
    "combine",
    "grouped_swiglu",
    "grouped_swiglu_by_ends",
    "merge_states",
    "paged_attention",
    "qk_norm_rope",
    "rms_norm",
    "route_topk",
    "sort_by_expert",
    "store_kv",
]
