"""Measures the candidate launches of bench/decode_candidates.py against what the engine runs, each in the chain of a
layer it sits in (the launch before it and after it, which is where its scheduling shows), in CUDA graphs of 48
chains, one a layer with weights of its own (past the L2), at 1 and 4 tokens (Qwen3-30B-A3B shapes):
- add_norm: o projection -> add-norm -> router gate projection, FlashInfer's fused add-norm against the candidate;
- route_sort: router gate -> top-k -> sort by expert (two launches) against the one-launch candidate, checked equal;
- down: expert gate/up -> down projection, triton_expert's against the one that reads its weight before its wait
  (12 layers of experts, 3.6 GB), checked against each other;
- combine: down projection -> combine + add-norm, triton_moe's against the one that reads all but the expert rows
  before its wait, checked equal.

Times are medians of triton.testing.do_bench over replays (L2 flushed before each), per chain. Writes
bench/results/decode_candidates_gpu.json (or --out).

    python3 bench/decode_candidates_gpu.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
from functools import partial
from pathlib import Path
from typing import Any

import decode_candidates
import torch
from decode_kernels_gpu import (
    BF16,
    DIM,
    EXPERTS,
    HEADS,
    HIDDEN,
    LAYERS,
    TOP_K,
    WIDTH,
    expert_weights,
    layer_weights,
    per_call_us,
)
from gpu_timing import TIMING
from rich.console import Console

from nanocp import kernels
from nanocp.kernels import triton_expert, triton_linear, triton_moe

RESULTS = Path(__file__).parent / "results"
console = Console()


def o_norm_gate(norm: Any, attn: torch.Tensor, residual: torch.Tensor, w: tuple[torch.Tensor, ...]) -> torch.Tensor:
    normed, _ = norm(triton_linear.small_linear(attn, w[0]), residual, w[1], 1e-6)  # in place on CUDA
    return triton_linear.small_linear(normed, w[2])


def add_norm_points() -> list[dict[str, Any]]:
    points = []
    layers = list(zip(layer_weights(HIDDEN, HEADS * DIM), [torch.ones(HIDDEN, device="cuda", dtype=BF16)] * LAYERS,
                      layer_weights(EXPERTS, HIDDEN), strict=True))  # fmt: skip
    for tokens in [1, 2]:  # the rows small_linear serves
        attn = torch.randn(tokens, HEADS * DIM, device="cuda").to(BF16)
        us = {}
        for label, norm in (("flashinfer", kernels.add_rms_norm), ("candidate", decode_candidates.add_rms_norm)):
            residual = torch.randn(tokens, HIDDEN, device="cuda").to(BF16)
            us[label], _ = per_call_us([partial(o_norm_gate, norm, attn, residual, w) for w in layers])
        # One chain each way from the same residual: the same gate logits up to the norms' summation order.
        residuals = [torch.randn(tokens, HIDDEN, device="cuda").to(BF16) for _ in range(2)]
        residuals[1].copy_(residuals[0])
        ours = o_norm_gate(decode_candidates.add_rms_norm, attn, residuals[0], layers[0])
        theirs = o_norm_gate(kernels.add_rms_norm, attn, residuals[1], layers[0])
        diff = (ours.float() - theirs.float()).abs().max().item()
        point = {"tokens": tokens, "flashinfer_us": us["flashinfer"], "candidate_us": us["candidate"],
                 "gate_max_abs_diff": diff}  # fmt: skip
        points.append(point)
        console.print(f"o -> add-norm -> gate, {tokens} tokens: {point}")
    return points


def gate_route_sort(x: torch.Tensor, w: torch.Tensor) -> Any:
    weights_, experts = triton_moe.route_topk(triton_linear.small_linear(x, w), TOP_K, True, BF16)
    return weights_, experts, triton_moe.sort_by_expert(experts, EXPERTS)


def gate_route_and_sort(x: torch.Tensor, w: torch.Tensor) -> Any:
    return decode_candidates.route_and_sort(triton_linear.small_linear(x, w), TOP_K, True, BF16)


def route_sort_points() -> list[dict[str, Any]]:
    points = []
    gates = layer_weights(EXPERTS, HIDDEN)
    for tokens in [1, 4]:
        x = torch.randn(tokens, HIDDEN, device="cuda").to(BF16)
        two_us, theirs = per_call_us([partial(gate_route_sort, x, w) for w in gates])
        one_us, ours = per_call_us([partial(gate_route_and_sort, x, w) for w in gates])
        equal = all(
            all(torch.equal(a, b) for a, b in zip((o[0], o[1], *o[2]), (t[0], t[1], *t[2]), strict=True))
            for o, t in zip(ours, theirs, strict=True)
        )
        point = {"tokens": tokens, "two_launches_us": two_us, "one_launch_us": one_us, "equal": equal}
        points.append(point)
        console.print(f"gate -> top-k -> sort, {tokens} tokens: {point}")
    return points


def gate_up_then(down: Any, rows: kernels.TokenRows, ends: torch.Tensor, w: tuple[torch.Tensor, ...]) -> Any:
    h = triton_expert._expert_matmul(rows, ends, w[0], True, triton_expert.GATE_UP_BLOCKS)
    return down(h, ends, w[1])


def current_down(h: torch.Tensor, ends: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    return triton_expert._expert_matmul(h, ends, w_down, False, triton_expert.DOWN_BLOCKS)


def down_points() -> list[dict[str, Any]]:
    points = []
    experts = [(expert_weights(2 * WIDTH, HIDDEN), expert_weights(HIDDEN, WIDTH)) for _ in range(LAYERS // 4)]
    for tokens in [1, 2]:  # every expert's rows in one tile of 16
        x = torch.randn(tokens, HIDDEN, device="cuda").to(BF16)
        chosen = torch.stack([torch.randperm(EXPERTS, device="cuda")[:TOP_K] for _ in range(tokens)])
        entries, _, ends = kernels.sort_by_expert(chosen, EXPERTS)
        rows = kernels.TokenRows(x, entries, TOP_K)
        us, outs = {}, {}
        for label, down in (("current", current_down), ("candidate", decode_candidates.down_prefetched)):
            us[label], outs[label] = per_call_us([partial(gate_up_then, down, rows, ends, w) for w in experts])
        diff = max(
            (a.float() - b.float()).abs().max().item() for a, b in zip(outs["current"], outs["candidate"], strict=True)
        )
        point = {"tokens": tokens, "current_us": us["current"], "candidate_us": us["candidate"], "max_abs_diff": diff}
        points.append(point)
        console.print(f"gate/up -> down, {tokens} tokens: {point}")
    return points


def down_then_combine(
    combine: Any, h: torch.Tensor, ends: torch.Tensor, w: torch.Tensor, route: tuple[torch.Tensor, ...]
) -> Any:
    """route: (position, weights, residual, norm weight)."""
    return combine(current_down(h, ends, w), *route, 1e-6)


def combine_points() -> list[dict[str, Any]]:
    points = []
    downs = [expert_weights(HIDDEN, WIDTH) for _ in range(LAYERS // 4)]
    variants = {"current": triton_moe.combine_add_rms_norm, "candidate": decode_candidates.combine_add_rms_norm}
    for tokens in [1, 2]:
        chosen = torch.stack([torch.randperm(EXPERTS, device="cuda")[:TOP_K] for _ in range(tokens)])
        _, position, ends = kernels.sort_by_expert(chosen, EXPERTS)
        h = torch.randn(tokens * TOP_K, WIDTH, device="cuda").to(BF16)  # gate/up's output, rows sorted by expert
        weights_ = torch.rand(tokens, TOP_K, device="cuda").to(BF16)
        norm_weight = torch.ones(HIDDEN, device="cuda", dtype=BF16)
        us = {}
        for label, combine in variants.items():
            route = (position, weights_, torch.zeros(tokens, HIDDEN, device="cuda", dtype=BF16), norm_weight)
            us[label], _ = per_call_us([partial(down_then_combine, combine, h, ends, w, route) for w in downs])
        fresh = [torch.ones(tokens, HIDDEN, device="cuda", dtype=BF16) for _ in variants]  # one eager call each
        once = [down_then_combine(c, h, ends, downs[0], (position, weights_, r, norm_weight))
                for c, r in zip(variants.values(), fresh, strict=True)]  # fmt: skip
        equal = all(torch.equal(a, b) for a, b in zip(*once, strict=True))
        point = {"tokens": tokens, "current_us": us["current"], "candidate_us": us["candidate"], "equal": equal}
        points.append(point)
        console.print(f"down -> combine + add-norm, {tokens} tokens: {point}")
    return points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.manual_seed(0)
    result: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                              "timing": f"a graph of {LAYERS} chains (one a layer), per chain; {TIMING}"}  # fmt: skip
    parts = {"add_norm": add_norm_points, "route_sort": route_sort_points, "down": down_points,
             "combine": combine_points}  # fmt: skip
    for name, measure in parts.items():
        result[name] = measure()
        args.out.mkdir(parents=True, exist_ok=True)  # written after each part: a cut-short run keeps what it has
        (args.out / "decode_candidates_gpu.json").write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"wrote {args.out / 'decode_candidates_gpu.json'}")


if __name__ == "__main__":
    main()
