"""The fused decode kernels (FlashInfer norms, Triton QK-norm + rotary, MoE steps and expert SwiGLU) against the torch
reference, both on the GPU: the reference runs on float32 copies of the same bf16 inputs (float32 takes the reference
path at the kernel interface). Outputs by relative error < 1e-2, as in test_kernels_gpu.py; the sort by expert and a
graph replay of the expert kernels against their eager call exactly.
"""

from __future__ import annotations

import pytest
import torch

from nanocp import kernels
from nanocp.kernels import gpu_moe
from nanocp.kernels.moe import reference_grouped_swiglu
from nanocp.worker.model import Rotary

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
triton_moe = pytest.importorskip("nanocp.kernels.triton_moe", reason="needs Triton (GPU machines)")
triton_expert = pytest.importorskip("nanocp.kernels.triton_expert", reason="needs Triton (GPU machines)")

HEADS, KV_HEADS, DIM, HIDDEN, EXPERTS, TOP_K, WIDTH = 32, 4, 128, 2048, 128, 8, 768  # Qwen3-30B-A3B
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


@pytest.mark.parametrize("tokens", [1, 5, 64, 1000])  # 1000: a prefill chunk's heads a program (head_block_for)
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


@pytest.mark.parametrize("tokens", [1, 3, 64, 256, 1025, 2500])  # one program per expert; tiles past 1024 tokens
def test_sort_by_expert_is_the_stable_sort(tokens: int) -> None:
    experts = torch.stack([torch.randperm(EXPERTS, device="cuda")[:TOP_K] for _ in range(tokens)])
    experts[: tokens // 2] %= 4  # crowd some experts, so many rows share one
    entries, position, ends = triton_moe.sort_by_expert(experts, EXPERTS)
    ref_entries, ref_position, ref_ends = kernels.sort_by_expert(experts.cpu(), EXPERTS)
    assert torch.equal(entries.cpu(), ref_entries) and torch.equal(position.cpu(), ref_position)
    assert torch.equal(ends.cpu(), ref_ends)


@pytest.mark.parametrize("tokens", [1, 7, 64, 1000])
def test_qk_norm_rope_stores_k_and_v_in_their_slots(tokens: int) -> None:
    """The launch that makes q and k also writes each row's K and V into its slot, exactly what store_kv writes;
    rows with slot -1 (a remote tail, padding) write nothing."""
    rotary = Rotary(DIM, 1e6, 4096).cuda()
    rotary.reset()
    qkv = torch.randn(tokens, (HEADS + 2 * KV_HEADS) * DIM, device="cuda").to(BF16)
    positions = torch.randint(0, 4096, (tokens,), device="cuda")
    q_w, k_w = (1 + 0.1 * torch.randn(2, DIM, device="cuda")).to(BF16)
    pages = max(4, tokens // 8)
    slots = torch.randperm(pages * 16, device="cuda")[:tokens]
    slots[1::3] = -1  # the first row kept, every third after it not
    caches = [torch.zeros(pages, 16, KV_HEADS, DIM, device="cuda", dtype=BF16) for _ in range(4)]
    args = (rotary.cos, rotary.sin, EPS, HEADS, KV_HEADS)
    q, k, v = kernels.qk_norm_rope(qkv, positions, q_w, k_w, *args, store=(caches[0], caches[1], slots))
    q2, k2, v2 = kernels.qk_norm_rope(qkv, positions, q_w, k_w, *args)
    assert torch.equal(q, q2) and torch.equal(k, k2) and torch.equal(v, v2)
    kernels.store_kv(caches[2], caches[3], k2, v2, slots)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
    assert caches[0].flatten(0, 1)[slots[slots >= 0]].abs().sum() > 0


@pytest.mark.parametrize("tokens", [1, 17, 256])
def test_combine_add_rms_norm_matches_combine_then_add_norm(tokens: int) -> None:
    """An MoE layer's rows combined in the next add-norm's launch, against the reference's combine, add and norm."""
    rows = tokens * TOP_K
    y = torch.randn(rows, HIDDEN, device="cuda").to(BF16)
    position = torch.randperm(rows, device="cuda")
    weights = torch.rand(tokens, TOP_K, device="cuda").to(BF16)
    residual = torch.randn(tokens, HIDDEN, device="cuda").to(BF16)
    norm_weight = (1 + 0.1 * torch.randn(HIDDEN, device="cuda")).to(BF16)
    ref_normed, ref_residual = kernels.add_rms_norm(
        kernels.ExpertOutputs(y.float(), position, weights.float()), residual.float(), norm_weight.float(), EPS
    )
    normed, summed = kernels.add_rms_norm(kernels.ExpertOutputs(y, position, weights), residual, norm_weight, EPS)
    assert summed.data_ptr() == residual.data_ptr(), "the residual stream is updated in place"
    assert rel_err(summed, ref_residual) < 1e-2 and rel_err(normed, ref_normed) < 1e-2


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


def expert_weights(experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    w_gate_up = (torch.randn(experts, 2 * WIDTH, HIDDEN, device="cuda") * HIDDEN**-0.5).to(BF16)
    return w_gate_up, (torch.randn(experts, HIDDEN, WIDTH, device="cuda") * WIDTH**-0.5).to(BF16)


def routed_counts(tokens: int, experts: int) -> list[int]:
    """Each token's top-8 of the experts at random: uneven counts, and at few tokens most experts empty."""
    scores = torch.rand(tokens, experts, generator=torch.Generator().manual_seed(tokens))
    chosen = scores.topk(TOP_K, dim=-1).indices.flatten()
    return torch.bincount(chosen, minlength=experts).tolist()


COUNTS = {
    "1 token": routed_counts(1, EXPERTS),
    "8 tokens": routed_counts(8, EXPERTS),
    "64 tokens": routed_counts(64, EXPERTS),
    "uneven, empty ends": [0, 0, 1, 33, 0, 16, 17, 2, 0, 0],  # row tiles of 16: one row, 2 full + 1, exactly one
    "one busy expert": [0, 0, 0, 100, 0, 0],
    "all empty": [0, 0, 0, 0],
}


@pytest.mark.parametrize("case", list(COUNTS))
def test_triton_expert_swiglu_matches_reference(case: str) -> None:
    counts = COUNTS[case]
    w_gate_up, w_down = expert_weights(len(counts))
    x = torch.randn(sum(counts), HIDDEN, device="cuda").to(BF16)
    ends = torch.tensor(counts, device="cuda").cumsum(0).to(torch.int32)
    out = triton_expert.grouped_swiglu(x, ends, w_gate_up, w_down)
    assert out.dtype == BF16 and out.shape == x.shape
    if sum(counts):
        ref = reference_grouped_swiglu(x.float(), counts, w_gate_up.float(), w_down.float())
        assert rel_err(out, ref) < 1e-2
        assert rel_err(gpu_moe.grouped_mm_swiglu(x, ends, w_gate_up, w_down), ref) < 1e-2


@pytest.mark.parametrize("case", ["1 token", "8 tokens"])  # the few-rows tiles and the others
def test_triton_expert_swiglu_reads_no_empty_expert_and_replays_exactly(case: str) -> None:
    """Empty experts' weights set to NaN must not reach the output; the interface's path at a decode step's rows is
    the Triton one, and a CUDA graph's replay equals the eager call bit for bit (no atomics)."""
    counts = COUNTS[case]
    assert sum(counts) <= gpu_moe.TRITON_MAX_ROWS
    w_gate_up, w_down = expert_weights(len(counts))
    empty = torch.tensor(counts, device="cuda") == 0
    w_gate_up[empty], w_down[empty] = float("nan"), float("nan")
    x = torch.randn(sum(counts), HIDDEN, device="cuda").to(BF16)
    ends = torch.tensor(counts, device="cuda").cumsum(0).to(torch.int32)
    eager = kernels.grouped_swiglu_by_ends(x, ends, w_gate_up, w_down)
    assert torch.equal(eager, triton_expert.grouped_swiglu(x, ends, w_gate_up, w_down))
    assert not eager.isnan().any()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        kernels.grouped_swiglu_by_ends(x, ends, w_gate_up, w_down)  # compiles outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        replayed = kernels.grouped_swiglu_by_ends(x, ends, w_gate_up, w_down)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(replayed, eager)


@pytest.mark.parametrize("tokens", [1, 8, 300])  # 300 x top-8 rows: past TRITON_MAX_ROWS, the grouped GEMMs' path
def test_expert_rows_read_from_their_tokens_equal_the_gathered_rows(tokens: int) -> None:
    """TokenRows (each sorted row read from its token in the expert kernel's loads) computes exactly what the same
    kernels compute on the rows gathered first, and matches the reference."""
    w_gate_up, w_down = expert_weights(EXPERTS)
    x = torch.randn(tokens, HIDDEN, device="cuda").to(BF16)
    experts = torch.stack([torch.randperm(EXPERTS, device="cuda")[:TOP_K] for _ in range(tokens)])
    entries, _, ends = kernels.sort_by_expert(experts, EXPERTS)
    rows = kernels.TokenRows(x, entries, TOP_K)
    in_place = kernels.grouped_swiglu_by_ends(rows, ends, w_gate_up, w_down)
    gathered = x[entries // TOP_K]
    assert torch.equal(in_place, kernels.grouped_swiglu_by_ends(gathered, ends, w_gate_up, w_down))
    counts = torch.diff(ends, prepend=ends.new_zeros(1)).tolist()
    assert (
        rel_err(in_place, reference_grouped_swiglu(gathered.float(), counts, w_gate_up.float(), w_down.float())) < 1e-2
    )


@pytest.mark.parametrize(("experts", "top_k"), [(64, 6), (8, 2), (60, 4)])
def test_route_topk_at_other_expert_and_top_k_counts(experts: int, top_k: int) -> None:
    """Top-k counts that are not a power of two (DeepSeek's 6), and expert counts that are not either."""
    logits = torch.randn(33, experts, device="cuda").to(BF16)
    weights, chosen = kernels.route_topk(logits, top_k, True, BF16)
    ref_weights, ref_chosen = kernels.route_topk(logits.float(), top_k, True, torch.float32)
    assert chosen.shape == (33, top_k) and torch.equal(logits.gather(1, chosen), logits.gather(1, ref_chosen))
    assert rel_err(weights, ref_weights) < 1e-2
