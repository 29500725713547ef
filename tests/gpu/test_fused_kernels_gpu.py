"""The fused decode kernels (FlashInfer norms, Triton QK-norm + rotary and MoE steps) against the torch reference,
both on the GPU: the reference runs on float32 copies of the same bf16 inputs (float32 takes the reference path at
the kernel interface). Outputs by relative error < 1e-2, as in test_kernels_gpu.py; the sort by expert exactly.
"""

from __future__ import annotations

import pytest
import torch

from nanocp import kernels
from nanocp.worker.model import Rotary

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
triton_moe = pytest.importorskip("nanocp.kernels.triton_moe", reason="needs Triton (GPU machines)")

HEADS, KV_HEADS, DIM, HIDDEN, EXPERTS, TOP_K = 32, 4, 128, 2048, 128, 8  # Qwen3-30B-A3B
BF16 = torch.bfloat16
EPS = 1e-6


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


@pytest.mark.parametrize("rows", [1, 7, 64])
def test_rms_norm_and_fused_add(rows: int) -> None:
    x = torch.randn(rows, HIDDEN, device="cuda").to(BF16)
    residual = torch.randn(rows, HIDDEN, device="cuda").to(BF16)
    weight = (1 + 0.1 * torch.randn(HIDDEN, device="cuda")).to(BF16)
    assert rel_err(kernels.rms_norm(x, weight, EPS), kernels.rms_norm(x.float(), weight.float(), EPS)) < 1e-2
    ref_normed, ref_residual = kernels.add_rms_norm(x.float(), residual.float(), weight.float(), EPS)
    normed, summed = kernels.add_rms_norm(x.clone(), residual.clone(), weight, EPS)
    assert rel_err(summed, ref_residual) < 1e-2
    assert rel_err(normed, ref_normed) < 1e-2


@pytest.mark.parametrize("tokens", [1, 5, 64])
def test_qk_norm_rope_matches_reference(tokens: int) -> None:
    rotary = Rotary(DIM, 1e6, 4096).cuda()
    rotary.reset()
    qkv = torch.randn(tokens, (HEADS + 2 * KV_HEADS) * DIM, device="cuda").to(BF16)
    positions = torch.randint(0, 4096, (tokens,), device="cuda")
    q_w = (1 + 0.1 * torch.randn(DIM, device="cuda")).to(BF16)
    k_w = (1 + 0.1 * torch.randn(DIM, device="cuda")).to(BF16)
    args = (rotary.cos, rotary.sin, EPS, HEADS, KV_HEADS)
    q, k, v = kernels.qk_norm_rope(qkv, positions, q_w, k_w, *args)
    ref_q, ref_k, ref_v = kernels.qk_norm_rope(qkv.float(), positions, q_w.float(), k_w.float(), *args)
    assert q.shape == (tokens, HEADS, DIM) and k.shape == (tokens, KV_HEADS, DIM) and q.is_contiguous()
    assert rel_err(q, ref_q) < 1e-2 and rel_err(k, ref_k) < 1e-2
    assert torch.equal(v.float(), ref_v)


@pytest.mark.parametrize("tokens", [1, 9, 256])
def test_route_topk_matches_reference(tokens: int) -> None:
    logits = torch.randn(tokens, EXPERTS, device="cuda").to(BF16)
    for renormalize in (True, False):
        weights, experts = kernels.route_topk(logits, TOP_K, renormalize, BF16)
        ref_weights, ref_experts = kernels.route_topk(logits.float(), TOP_K, renormalize, torch.float32)
        # bf16 logits tie often: tied experts may come in either order, so compare what was chosen by its logit.
        assert torch.equal(logits.gather(1, experts), logits.gather(1, ref_experts))
        assert (experts.sort(dim=1).values.diff(dim=1) > 0).all(), "each token's experts are distinct"
        assert weights.dtype == BF16 and rel_err(weights, ref_weights) < 1e-2


@pytest.mark.parametrize("tokens", [1, 3, 64, 256])
def test_sort_by_expert_is_the_stable_sort(tokens: int) -> None:
    experts = torch.stack([torch.randperm(EXPERTS, device="cuda")[:TOP_K] for _ in range(tokens)])
    experts[: tokens // 2] %= 4  # crowd some experts, so many rows share one
    entries, position, ends = triton_moe.sort_by_expert(experts, EXPERTS)
    ref_entries, ref_position, ref_ends = kernels.sort_by_expert(experts.cpu(), EXPERTS)
    assert torch.equal(entries.cpu(), ref_entries) and torch.equal(position.cpu(), ref_position)
    assert torch.equal(ends.cpu(), ref_ends)


@pytest.mark.parametrize("tokens", [1, 17])
def test_combine_and_silu_mul(tokens: int) -> None:
    rows = tokens * TOP_K
    y = torch.randn(rows, HIDDEN, device="cuda").to(BF16)
    position = torch.randperm(rows, device="cuda")
    weights = torch.rand(tokens, TOP_K, device="cuda").to(BF16)
    ref = kernels.combine(y.float(), position, weights.float())
    assert rel_err(kernels.combine(y, position, weights), ref) < 1e-2
    gate_up = torch.randn(rows, 2 * 768, device="cuda").to(BF16)
    gate, up = gate_up.float().chunk(2, dim=-1)
    assert rel_err(triton_moe.silu_mul(gate_up), torch.nn.functional.silu(gate) * up) < 1e-2
