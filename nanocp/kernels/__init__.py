"""Attention, merge and MoE ops behind one interface, chosen by the tensors' device: plain torch on CPU (also the
reference the GPU kernels are tested against), FlashInfer, Triton and grouped GEMM on CUDA.

Convention at this interface: log-sum-exp values are natural logarithms (backends in base 2 convert at their edge).
"""

from nanocp.kernels.attention import AttentionMetadata, merge_states, paged_attention, store_kv
from nanocp.kernels.moe import grouped_swiglu, grouped_swiglu_by_ends

__all__ = [
    "AttentionMetadata",
    "grouped_swiglu",
    "grouped_swiglu_by_ends",
    "merge_states",
    "paged_attention",
    "store_kv",
]
