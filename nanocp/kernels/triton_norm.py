"""The residual stream's add + RMS norm on CUDA, one launch, in place as FlashInfer's fused_add_rmsnorm is (residual +=
x rounded to its dtype; x = the RMS norm of the float32 sum times the weight), but launched so the next kernel gets
going sooner: FlashInfer's norm lets its dependents be scheduled only when it ends, so the router's gate projection
after it starts reading its weight only then; this one lets them be scheduled as soon as its own wait returns, as the
engine's other Triton kernels do (1.0 us a layer at one and two rows on the H200, results/decode_candidates_gpu.json).

`store_sum_and_norm` is the tail it shares with the MoE combine that adds an MoE layer's rows to the stream.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nanocp.kernels.triton_pdl import await_inputs, launch_options


@triton.jit
def store_sum_and_norm(summed, residual_ptr, out_ptr, norm_weight, token, cols, mask, hidden, eps):  # type: ignore[no-untyped-def]
    """Stores summed (a row's float32 residual + addend) as the residual and its RMS norm times norm_weight as out."""
    tl.store(residual_ptr + token * hidden + cols, summed.to(residual_ptr.dtype.element_ty), mask=mask)
    scale = tl.rsqrt(tl.sum(summed * summed, axis=0) / hidden + eps)
    tl.store(out_ptr + token * hidden + cols, (summed * scale * norm_weight).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _add_rms_norm_kernel(  # type: ignore[no-untyped-def]
    x_ptr, residual_ptr, weight_ptr, hidden, eps, BLOCK: tl.constexpr, PDL: tl.constexpr
):
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)  # a parameter: read before the wait
    await_inputs(PDL)
    token = tl.program_id(0).to(tl.int64)
    summed = tl.load(x_ptr + token * hidden + cols, mask=mask, other=0.0).to(tl.float32)
    summed += tl.load(residual_ptr + token * hidden + cols, mask=mask, other=0.0).to(tl.float32)
    store_sum_and_norm(summed, residual_ptr, x_ptr, weight, token, cols, mask, hidden, eps)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """kernels.add_rms_norm on CUDA, in place: (x, residual) become (the norm of their sum, their sum); both
    contiguous (tokens, hidden)."""
    tokens, hidden = x.shape
    if tokens:
        _add_rms_norm_kernel[(tokens,)](
            x, residual, weight, hidden, eps, triton.next_power_of_2(hidden), num_warps=8, **launch_options(x)
        )
    return x, residual
