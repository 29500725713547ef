"""The small-batch pieces of a decode step's layer on one GPU, each alternative in a CUDA graph, Qwen3-30B-A3B
shapes (bf16): a graph repeats the call once per layer (48 times; the experts' 12 times, with weights of their
own each, as the model's layers have), so a call's time excludes the graph's launch.

- experts: the (token, expert) rows gathered by kernels before the expert kernels, against read from their tokens
  in the kernels' loads (kernels.TokenRows, what the model runs);
- router: the top-k kernel (triton_moe.route_topk) against torch's softmax, topk and renormalisation;
- fusions: the MoE combine and the next layer's add-norm (two launches) against the combine inside the add-norm
  (kernels.ExpertOutputs, what the model runs), and the QK-norm + rotary kernel followed by store_kv against the K,
  V stored by the QK-norm kernel itself;
- decode attention: FlashInfer's graph decode with the log-sum-exp (a partial, merged with others) and without it
  (a lone instance's rows: GraphDecode.output), at 1 to 256 rows and 16 to 64K tokens a row;
- split: the graph decode with FlashInfer's KV split and without it, uniform and skewed batches of 32 to 256 rows;
- linear: the layer's projections (qkv, o, the router's gate) at 1 to 4 rows, cuBLAS against the Triton kernel that
  reads its weight while the kernel before it runs (triton_linear), each after a norm as in the
  model (FlashInfer's norm, launched with PDL), every layer with weights of its own (2.2 GB, past the L2);
- triton_decode: the split-KV decode of the small graph buckets (kernels/triton_decode.py) against FlashInfer's graph
  decode (with the log-sum-exp, as a CP partial needs it) at 1 to 16 rows, at each split cap;
- add_norm: o projection -> add-norm -> router gate projection at 1 and 2 rows, FlashInfer's fused add-norm (which
  lets its dependents start only when it ends) against the engine's Triton one (which lets the gate projection start
  reading its weight as soon as its own wait returns). Measured first, with three more candidates that lost or were
  folded into the engine's kernels, by bench/decode_candidates_gpu.py of commit 911700f
  (results/decode_candidates_gpu.json);
- expert_tiles: the expert SwiGLU's gate/up and down tiles at 1 to 8 tokens (EXPERT_TILES).

The alternatives are checked against each other (bit-equality where the arithmetic is the same, agreement of the
chosen experts otherwise). Times are medians of triton.testing.do_bench over replays (L2 flushed before each).
Writes bench/results/decode_kernels_gpu.json (or --out). A first version of this script (git history) also
measured a Triton one-launch linear without PDL against cuBLAS (no faster at 1 to 64 rows, called back to back) and
FlashInfer's CUDA-core decode (faster at 16 tokens, slower from 1K): neither is used.

    python3 bench/decode_kernels_gpu.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import flashinfer
import torch
import torch.nn.functional as F
import triton
from gpu_timing import TIMING, bench_ms, copy_bandwidth, graphed
from moe_kernels import parse_blocks
from rich.console import Console

from nanocp import kernels
from nanocp.kernels import flashinfer_attention, triton_decode, triton_expert, triton_linear, triton_moe

RESULTS = Path(__file__).parent / "results"
HIDDEN, HEADS, KV_HEADS, DIM, EXPERTS, TOP_K, WIDTH = 2048, 32, 4, 128, 128, 8, 768
LAYERS = 48
BF16 = torch.bfloat16
PAGE = 16
console = Console()


def per_call_us(calls: list[Callable[[], Any]]) -> tuple[float, list[Any]]:
    """Microseconds a call, the calls captured in one graph and replayed; and their outputs."""
    replay, outs = graphed(lambda: [call() for call in calls])
    return bench_ms(replay) * 1e3 / len(calls), outs


def torch_topk(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    weights, experts = torch.topk(F.softmax(logits, dim=-1, dtype=torch.float32), TOP_K, dim=-1)
    return (weights / weights.sum(dim=-1, keepdim=True)).to(BF16), experts


def router_points() -> list[dict[str, Any]]:
    points = []
    for tokens in [1, 8, 64, 256]:
        logits = [torch.randn(tokens, EXPERTS, device="cuda").to(BF16) for _ in range(LAYERS)]
        kernel_us, ours = per_call_us([partial(triton_moe.route_topk, g, TOP_K, True, BF16) for g in logits])
        torch_us, theirs = per_call_us([partial(torch_topk, g) for g in logits])
        agree = all(
            torch.equal(g.gather(1, a[1]), g.gather(1, b[1])) for g, a, b in zip(logits, ours, theirs, strict=True)
        )
        points.append({"tokens": tokens, "kernel_us": kernel_us, "torch_us": torch_us, "same_choices": agree})
        console.print(f"top-k {tokens:3} tokens: kernel {kernel_us:.2f} us, torch {torch_us:.2f} us, same {agree}")
    return points


def gathered_first(rows: kernels.TokenRows, ends: torch.Tensor, w: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return triton_expert.grouped_swiglu(rows.gather(), ends, *w)


def layer_weights(outputs: int, depth: int) -> list[torch.Tensor]:
    """A projection's weight for each of the LAYERS layers (together past the L2)."""
    return [(torch.randn(outputs, depth, device="cuda") * depth**-0.5).to(BF16) for _ in range(LAYERS)]


def expert_weights(out: int, inner: int) -> torch.Tensor:
    return (torch.randn(EXPERTS, out, inner, device="cuda") * inner**-0.5).to(BF16)


def expert_points() -> list[dict[str, Any]]:
    points = []
    # A quarter of the layers' experts (12 x 128 experts, 3.6 GB, far past the L2), each called once in a graph.
    weights = [(expert_weights(2 * WIDTH, HIDDEN), expert_weights(HIDDEN, WIDTH)) for _ in range(LAYERS // 4)]
    for tokens in [1, 8, 64]:
        x = torch.randn(tokens, HIDDEN, device="cuda").to(BF16)
        experts = torch.stack([torch.randperm(EXPERTS, device="cuda")[:TOP_K] for _ in range(tokens)])
        entries, _, ends = kernels.sort_by_expert(experts, EXPERTS)
        rows = kernels.TokenRows(x, entries, TOP_K)
        gathered_us, a = per_call_us([partial(gathered_first, rows, ends, w) for w in weights])
        in_loads_us, b = per_call_us([partial(triton_expert.grouped_swiglu, rows, ends, w[0], w[1]) for w in weights])
        equal = all(torch.equal(p, q) for p, q in zip(a, b, strict=True))
        points.append({"tokens": tokens, "gathered_us": gathered_us, "in_loads_us": in_loads_us, "equal": equal})
        console.print(f"experts {tokens:3} tokens: gathered first {gathered_us:.1f} us, in the loads "
                      f"{in_loads_us:.1f} us, equal {equal}")  # fmt: skip
    return points


def combine_then_add_norm(outputs: kernels.ExpertOutputs, residual: torch.Tensor, weight: torch.Tensor) -> Any:
    return kernels.add_rms_norm(outputs.combine(), residual, weight, 1e-6)


def norm_rope_then_store(qkv: torch.Tensor, positions: torch.Tensor, store: Any, weights: Any, rotary: Any) -> None:
    _, k, v = kernels.qk_norm_rope(qkv, positions, *weights, *rotary, 1e-6, HEADS, KV_HEADS)
    kernels.store_kv(store[0], store[1], k, v, store[2])


def fusion_points() -> list[dict[str, Any]]:
    points = []
    norm_weight = torch.ones(HIDDEN, device="cuda", dtype=BF16)
    positions_max = 8192
    rotary = (torch.randn(positions_max, DIM, device="cuda"), torch.randn(positions_max, DIM, device="cuda"))
    qk_weights = (torch.ones(DIM, device="cuda", dtype=BF16), torch.ones(DIM, device="cuda", dtype=BF16))
    caches = [torch.zeros(4096, PAGE, KV_HEADS, DIM, device="cuda", dtype=BF16) for _ in range(2)]
    for tokens in [1, 8, 64, 256]:
        y = torch.randn(tokens * TOP_K, HIDDEN, device="cuda").to(BF16)
        outputs = kernels.ExpertOutputs(y, torch.randperm(tokens * TOP_K, device="cuda"),
                                        torch.rand(tokens, TOP_K, device="cuda").to(BF16))  # fmt: skip
        residual = torch.randn(tokens, HIDDEN, device="cuda").to(BF16)
        two_us, _ = per_call_us([partial(combine_then_add_norm, outputs, residual, norm_weight)] * LAYERS)
        one_us, _ = per_call_us([partial(kernels.add_rms_norm, outputs, residual, norm_weight, 1e-6)] * LAYERS)
        qkv = torch.randn(tokens, (HEADS + 2 * KV_HEADS) * DIM, device="cuda").to(BF16)
        positions = torch.randint(0, positions_max, (tokens,), device="cuda")
        store = (*caches, torch.randperm(4096 * PAGE, device="cuda")[:tokens])
        then_store_us, _ = per_call_us(
            [partial(norm_rope_then_store, qkv, positions, store, qk_weights, rotary)] * LAYERS
        )
        stored_us, _ = per_call_us(
            [partial(kernels.qk_norm_rope, qkv, positions, *qk_weights, *rotary, 1e-6, HEADS, KV_HEADS, store=store)]
            * LAYERS
        )
        point = {"tokens": tokens, "combine_then_add_norm_us": two_us, "combine_in_add_norm_us": one_us,
                 "norm_rope_then_store_kv_us": then_store_us, "norm_rope_storing_us": stored_us}  # fmt: skip
        points.append(point)
        console.print(f"fusions {tokens:3} tokens: {point}")
    return points


PLAN_ARGS = {"num_qo_heads": HEADS, "num_kv_heads": KV_HEADS, "head_dim": DIM, "page_size": PAGE,
             "q_data_type": BF16, "kv_data_type": BF16, "sm_scale": DIM**-0.5}  # fmt: skip


def paged_caches(num_pages: int) -> tuple[torch.Tensor, torch.Tensor]:
    k_cache = torch.randn(num_pages, PAGE, KV_HEADS, DIM, device="cuda").to(BF16)
    return k_cache, torch.randn_like(k_cache)


def uniform_decode(
    rows: int, context: int, num_pages: int
) -> tuple[torch.Tensor, torch.Tensor, flashinfer_attention.GraphDecode]:
    """`rows` rows of `context` tokens on random pages: their pages (row by row), a query, and FlashInfer's graph
    decode planned for them."""
    pages = -(-context // PAGE)
    page_indices = torch.randperm(num_pages, device="cuda")[: rows * pages]
    meta = kernels.AttentionMetadata(
        [*range(rows + 1)], [b * pages for b in range(rows + 1)], page_indices, [context] * rows, PAGE, False
    )
    q = torch.randn(rows, HEADS, DIM, device="cuda").to(BF16)
    decode = flashinfer_attention.GraphDecode(rows, num_pages, PLAN_ARGS, q.device)
    decode.plan(meta)
    return page_indices, q, decode


def attention_points() -> list[dict[str, Any]]:
    points = []
    num_pages = 64 * 8192 // PAGE + 8
    k_cache, v_cache = paged_caches(num_pages)
    for rows, context in [(1, 16), (1, 1024), (1, 8192), (1, 65536), (8, 1024), (8, 8192), (64, 1024),
                          (64, 8192), (256, 1024)]:  # fmt: skip
        _, q, decode = uniform_decode(rows, context, num_pages)
        with_lse_us, a = per_call_us([partial(decode.run, q, k_cache, v_cache)] * LAYERS)
        output_us, b = per_call_us([partial(decode.output, q, k_cache, v_cache)] * LAYERS)
        equal = torch.equal(a[0][0], b[0])
        points.append({"rows": rows, "context": context, "with_lse_us": with_lse_us, "output_us": output_us,
                       "equal": equal})  # fmt: skip
        console.print(f"decode {rows:3} rows x {context:5}: with lse {with_lse_us:.1f} us, output alone "
                      f"{output_us:.1f} us, equal {equal}")  # fmt: skip
    return points


def split_points() -> list[dict[str, Any]]:
    """A graph's decode with FlashInfer's KV split and without it (GraphDecode's split_kv), around the rows where
    the graphs stop splitting (GraphDecode.can_split): uniform batches, and skewed ones where one row reads 64K
    tokens and the others 1K or 16 (the case a split helps, where one can still happen)."""
    points = []
    num_pages = 64 * 8192 // PAGE + 65536 // PAGE + 8
    k_cache, v_cache = paged_caches(num_pages)
    cases = [(32, [8192] * 32), (64, [1024] * 64), (64, [8192] * 64), (80, [1024] * 80), (128, [1024] * 128),
             (256, [1024] * 256), (64, [65536] + [1024] * 63), (80, [65536] + [1024] * 79),
             (64, [65536] + [16] * 63)]  # fmt: skip
    for rows, lens in cases:
        counts = [-(-n // PAGE) for n in lens]
        page_indptr = [0]
        for c in counts:
            page_indptr.append(page_indptr[-1] + c)
        page_indices = torch.randperm(num_pages, device="cuda")[: page_indptr[-1]]
        meta = kernels.AttentionMetadata([*range(rows + 1)], page_indptr, page_indices, lens, PAGE, False)
        q = torch.randn(rows, HEADS, DIM, device="cuda").to(BF16)
        times, outs = {}, {}
        for split in (True, False):
            decode = flashinfer_attention.GraphDecode(rows, num_pages, PLAN_ARGS, q.device, split_kv=split)
            decode.plan(meta)
            times[split], out = per_call_us([partial(decode.run, q, k_cache, v_cache)] * LAYERS)
            outs[split] = out[0][0].clone()
        diff = (outs[True].float() - outs[False].float()).abs().max().item()
        kind = "uniform" if len(set(lens)) == 1 else "skewed"
        point = {"rows": rows, "kind": kind, "max_context": max(lens), "mean_context": sum(lens) / rows,
                 "split_us": times[True], "no_split_us": times[False], "max_abs_diff": diff}  # fmt: skip
        points.append(point)
        console.print(f"split {rows:3} rows {kind} (max {max(lens)}, mean {sum(lens) / rows:.0f}): split "
                      f"{times[True]:.1f} us, no split {times[False]:.1f} us, max |diff| {diff:.2e}")  # fmt: skip
    return points


def norm_then_project(
    x: torch.Tensor, norm_weight: torch.Tensor, weight: torch.Tensor, project: Callable[..., Any]
) -> Any:
    return project(kernels.rms_norm(x, norm_weight, 1e-6), weight)


def linear_points() -> list[dict[str, Any]]:
    points = []
    shapes = {"qkv": ((HEADS + 2 * KV_HEADS) * DIM, HIDDEN), "o": (HIDDEN, HEADS * DIM), "gate": (EXPERTS, HIDDEN)}
    for name, (outputs, depth) in shapes.items():
        weights = layer_weights(outputs, depth)
        norm_weight = torch.ones(depth, device="cuda", dtype=BF16)
        for rows in [1, 2, 4]:
            x = torch.randn(rows, depth, device="cuda").to(BF16)
            us, outs = {}, {}
            for label, project in (("cublas", F.linear), ("triton", triton_linear.small_linear)):
                calls = [partial(norm_then_project, x, norm_weight, w, project) for w in weights]
                us[label], outs[label] = per_call_us(calls)
            diff = max(
                (a.float() - b.float()).abs().max().item() for a, b in zip(outs["cublas"], outs["triton"], strict=True)
            )
            point = {"projection": name, "rows": rows, "outputs": outputs, "depth": depth, "cublas_us": us["cublas"],
                     "triton_us": us["triton"], "max_abs_diff": diff}  # fmt: skip
            points.append(point)
            console.print(f"linear {name:4} {rows} rows: add-norm + cuBLAS {us['cublas']:.2f} us, add-norm + Triton "
                          f"{us['triton']:.2f} us, max |diff| {diff:.2e}")  # fmt: skip
    return points


def o_norm_gate(add_norm: Any, attn: torch.Tensor, residual: torch.Tensor, w: tuple[torch.Tensor, ...]) -> Any:
    normed, _ = add_norm(triton_linear.small_linear(attn, w[0]), residual, w[1], 1e-6)  # in place on CUDA
    return triton_linear.small_linear(normed, w[2])


def flashinfer_add_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> Any:
    flashinfer.norm.fused_add_rmsnorm(x, residual, weight, eps)
    return x, residual


def add_norm_points() -> list[dict[str, Any]]:
    """o projection -> add-norm -> router gate projection: FlashInfer's fused add-norm against the engine's (which
    lets the gate projection start reading its weight sooner)."""
    points = []
    layers = list(zip(layer_weights(HIDDEN, HEADS * DIM), [torch.ones(HIDDEN, device="cuda", dtype=BF16)] * LAYERS,
                      layer_weights(EXPERTS, HIDDEN), strict=True))  # fmt: skip
    for tokens in [1, 2]:  # the rows small_linear serves
        attn = torch.randn(tokens, HEADS * DIM, device="cuda").to(BF16)
        us, gates = {}, {}
        for label, add_norm in (("flashinfer", flashinfer_add_norm), ("engine", kernels.add_rms_norm)):
            residual = torch.randn(tokens, HIDDEN, device="cuda").to(BF16)
            us[label], _ = per_call_us([partial(o_norm_gate, add_norm, attn, residual, w) for w in layers])
            gates[label] = o_norm_gate(add_norm, attn, torch.ones_like(residual), layers[0])  # from the same residual
        diff = (gates["engine"].float() - gates["flashinfer"].float()).abs().max().item()
        point = {"tokens": tokens, "flashinfer_us": us["flashinfer"], "engine_us": us["engine"],
                 "gate_max_abs_diff": diff}  # fmt: skip
        points.append(point)
        console.print(f"o -> add-norm -> gate, {tokens} tokens: {point}")
    return points


# gate/up and down tiles (N x K x warps x stages) tried at few rows, the engine's first; --expert-tiles picks others.
EXPERT_TILES = ["32x128x4x4/64x128x4x4", "16x128x4x4/32x128x4x4", "16x256x4x3/32x256x4x3",
                "32x256x4x3/64x256x4x3", "32x128x4x2/64x128x4x2", "32x128x4x6/64x128x4x6",
                "16x128x2x4/16x128x2x4", "16x64x2x8/16x64x2x8", "16x512x4x2/32x256x4x3",
                "64x64x4x4/64x64x4x4", "32x128x8x4/64x128x8x4", "16x256x8x3/16x256x8x3",
                "32x256x4x4/64x256x4x4", "32x256x4x2/64x256x4x2", "32x256x8x3/64x256x8x3",
                "64x128x4x5/64x128x4x5", "32x128x4x8/64x128x4x8", "64x256x4x3/64x256x4x3",
                "32x256x4x3/64x128x4x5", "32x128x4x5/64x256x4x3", "16x256x4x4/32x256x4x4",
                "32x512x4x2/64x256x4x3", "64x64x4x6/64x64x4x6"]  # fmt: skip


def expert_tile_points(tiles: list[str]) -> list[dict[str, Any]]:
    """The expert SwiGLU (gate/up then down, rows read from their tokens) at 1 to 8 tokens with each of the tiles
    (gate/up then down, as EXPERT_TILES), 12 layers of experts in a graph, each with weights of its own."""
    points = []
    weights = [(expert_weights(2 * WIDTH, HIDDEN), expert_weights(HIDDEN, WIDTH)) for _ in range(LAYERS // 4)]
    for tokens in [1, 2, 4, 8]:
        x = torch.randn(tokens, HIDDEN, device="cuda").to(BF16)
        chosen = torch.stack([torch.randperm(EXPERTS, device="cuda")[:TOP_K] for _ in range(tokens)])
        entries, _, ends = kernels.sort_by_expert(chosen, EXPERTS)
        rows = kernels.TokenRows(x, entries, TOP_K)
        point: dict[str, Any] = {"tokens": tokens, "us": {}}
        reference = None
        for tile in tiles:
            calls = [partial(triton_expert.grouped_swiglu, rows, ends, *w, parse_blocks(tile)) for w in weights]
            point["us"][tile], outs = per_call_us(calls)
            reference = outs if reference is None else reference
            point[f"max_abs_diff {tile}"] = max(
                (a.float() - b.float()).abs().max().item() for a, b in zip(outs, reference, strict=True)
            )
        points.append(point)
        console.print(f"expert tiles, {tokens} tokens: " + ", ".join(f"{t} {us:.1f}" for t, us in point["us"].items()))
    return points


def triton_decode_points() -> list[dict[str, Any]]:
    points = []
    num_pages = 16 * 8192 // PAGE + 65536 // PAGE + 8
    k_cache, v_cache = paged_caches(num_pages)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for rows, context in [(1, 16), (1, 1024), (1, 8192), (1, 65536), (2, 1024), (2, 65536), (4, 1024), (8, 1024),
                          (8, 8192), (16, 1024)]:  # fmt: skip
        page_indices, q, decode = uniform_decode(rows, context, num_pages)
        flashinfer_us, theirs = per_call_us([partial(decode.run, q, k_cache, v_cache)] * LAYERS)
        pages = -(-context // PAGE)
        indptr = torch.arange(0, (rows + 1) * pages, pages, dtype=torch.int32, device="cuda")
        kv_lens = torch.full((rows,), context, dtype=torch.int32, device="cuda")
        point = {"rows": rows, "context": context, "flashinfer_us": flashinfer_us, "triton_us_by_splits": {}}
        for splits in sorted({triton_decode.splits_for(rows, KV_HEADS, sms, most) for most in (64, 128, 256)}):
            call = partial(
                triton_decode.decode, q, k_cache, v_cache, indptr, page_indices.int(), kv_lens, DIM**-0.5, splits
            )
            triton_us, ours = per_call_us([call] * LAYERS)
            o_diff = (ours[0][0].float() - theirs[0][0].float()).abs().max().item()
            lse_diff = (ours[0][1] - theirs[0][1]).abs().max().item()
            point["triton_us_by_splits"][splits] = triton_us
            point[f"max_abs_diff_{splits}"] = max(o_diff, lse_diff)
            console.print(
                f"decode {rows:2} rows x {context:5}: FlashInfer {flashinfer_us:.1f} us, Triton ({splits} splits) "
                f"{triton_us:.1f} us, max |diff| {o_diff:.2e} (lse {lse_diff:.2e})"
            )
        points.append(point)
    return points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--parts",
        default="router,experts,fusions,attention,split,linear,triton_decode,add_norm,expert_tiles",
        help="comma-separated, of these",
    )
    parser.add_argument("--expert-tiles", nargs="+", default=EXPERT_TILES, help="gate/up/down tiles for expert_tiles")
    args = parser.parse_args()
    torch.manual_seed(0)
    measure = {"router": router_points, "experts": expert_points, "fusions": fusion_points,
               "attention": attention_points, "split": split_points, "linear": linear_points,
               "triton_decode": triton_decode_points, "add_norm": add_norm_points,
               "expert_tiles": partial(expert_tile_points, args.expert_tiles)}  # fmt: skip
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "timing": f"a graph of {LAYERS} calls (one a layer), per call; {TIMING}",
        "copy_bandwidth_bytes_per_s": copy_bandwidth(),
    }
    parts = args.parts.split(",")
    for part in parts:
        result[part] = measure[part]()
    args.out.mkdir(parents=True, exist_ok=True)
    name = "decode_kernels_gpu" if len(parts) == len(measure) else "decode_kernels_gpu_" + "_".join(parts)
    path = args.out / f"{name}.json"
    path.write_text(json.dumps(result, indent=1))
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
