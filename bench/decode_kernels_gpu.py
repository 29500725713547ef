"""The small-batch choices of a decode step's kernels on one GPU, each alternative in a CUDA graph, Qwen3-30B-A3B
shapes (bf16): what the engine's thresholds are set from.

- linear: torch's F.linear (cuBLAS) against the Triton one-launch linear (triton_expert.linear) at several column
  and K blocks, for the QKV and output projections, the router's gate and the LM head, at 1 to 64 rows;
- router: gate GEMM then the top-k kernel, by cuBLAS or by the Triton linear;
- experts: the rows gathered by a kernel before the expert kernels, against gathered in their loads (TokenRows);
- decode attention: FlashInfer's graph decode on tensor cores against its CUDA-core decode, at 1 to 256 rows and
  16 to 8K tokens a row, with and without the log-sum-exp.

Every alternative is checked against its reference (relative error of the output, or bit-equality where the
arithmetic is the same). Times are medians of triton.testing.do_bench over graph replays (L2 flushed before each).
Writes bench/results/decode_kernels_gpu.json (or --out).

    python3 bench/decode_kernels_gpu.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from gpu_timing import TIMING, bench_ms, copy_bandwidth, graphed
from rich.console import Console

from nanocp import kernels
from nanocp.kernels import flashinfer_attention, triton_expert
from nanocp.kernels.triton_expert import Blocks

RESULTS = Path(__file__).parent / "results"
HIDDEN, HEADS, KV_HEADS, DIM, EXPERTS, TOP_K, WIDTH, VOCAB = 2048, 32, 4, 128, 128, 8, 768, 151936
BF16 = torch.bfloat16
PAGE = 16
QKV = HEADS * DIM + 2 * KV_HEADS * DIM
LINEARS = {"qkv": (QKV, HIDDEN), "o_proj": (HIDDEN, HEADS * DIM), "gate": (EXPERTS, HIDDEN)}
LINEAR_BLOCKS = [Blocks(16, 128), Blocks(16, 256), Blocks(32, 128), Blocks(32, 256), Blocks(64, 128), Blocks(16, 512)]
ROWS = [1, 2, 4, 8, 16, 32, 64]
console = Console()


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def graph_ms(fn: Callable[[], Any]) -> tuple[float, Any]:
    replay, out = graphed(fn)
    return bench_ms(replay), out


def linear_points() -> list[dict[str, Any]]:
    points = []
    shapes = {**LINEARS, "lm_head": (VOCAB, HIDDEN)}
    for name, (n, k) in shapes.items():
        w = (torch.randn(n, k, device="cuda") * k**-0.5).to(BF16)
        for rows in ROWS if name != "lm_head" else [1, 8]:
            x = torch.randn(rows, k, device="cuda").to(BF16)
            ref = F.linear(x.float(), w.float())
            cublas_ms, _ = graph_ms(lambda x=x, w=w: F.linear(x, w))
            point: dict[str, Any] = {"linear": name, "rows": rows, "n": n, "k": k, "cublas_ms": cublas_ms}
            for blocks in LINEAR_BLOCKS:
                ms, out = graph_ms(lambda x=x, w=w, b=blocks: triton_expert.linear(x, w, b))
                point[f"triton_{blocks.n}x{blocks.k}_ms"] = ms
                point[f"triton_{blocks.n}x{blocks.k}_rel_err"] = rel_err(out, ref)
            best = min((v, key) for key, v in point.items() if key.startswith("triton_") and key.endswith("_ms"))
            point["best_triton"] = best[1]
            point["weight_gb_per_s_cublas"] = n * k * 2 / cublas_ms / 1e6
            console.print(f"linear {name:8} rows {rows:3}: cuBLAS {cublas_ms * 1e3:6.1f} us, best {best[1]} "
                          f"{best[0] * 1e3:6.1f} us")  # fmt: skip
            points.append(point)
    return points


def router_points(best_gate: Blocks) -> list[dict[str, Any]]:
    points = []
    w = (torch.randn(EXPERTS, HIDDEN, device="cuda") * HIDDEN**-0.5).to(BF16)
    for rows in [1, 8, 64, 256]:
        x = torch.randn(rows, HIDDEN, device="cuda").to(BF16)
        cublas_ms, _ = graph_ms(lambda x=x: kernels.route_topk(F.linear(x, w), TOP_K, True, BF16))
        triton_ms, (wt, et) = graph_ms(
            lambda x=x: kernels.route_topk(triton_expert.linear(x, w, best_gate), TOP_K, True, BF16)
        )
        topk_ms, _ = graph_ms(lambda x=x: kernels.route_topk(x[:, :EXPERTS], TOP_K, True, BF16))
        ref_w, ref_e = kernels.route_topk(F.linear(x.float(), w.float()), TOP_K, True, torch.float32)
        points.append(
            {
                "rows": rows,
                "cublas_gate_topk_ms": cublas_ms,
                "triton_gate_topk_ms": triton_ms,
                "topk_alone_ms": topk_ms,
                "weights_rel_err": rel_err(wt, ref_w),
                "experts_agree": float((et.sort(1).values == ref_e.sort(1).values).float().mean()),
            }
        )
        console.print(f"router rows {rows:3}: cuBLAS+topk {cublas_ms * 1e3:.1f} us, Triton+topk {triton_ms * 1e3:.1f}"
                      f" us, topk alone {topk_ms * 1e3:.1f} us")  # fmt: skip
    return points


def expert_points() -> list[dict[str, Any]]:
    points = []
    w_gate_up = (torch.randn(EXPERTS, 2 * WIDTH, HIDDEN, device="cuda") * HIDDEN**-0.5).to(BF16)
    w_down = (torch.randn(EXPERTS, HIDDEN, WIDTH, device="cuda") * WIDTH**-0.5).to(BF16)
    for tokens in [1, 8, 64]:
        x = torch.randn(tokens, HIDDEN, device="cuda").to(BF16)
        experts = torch.stack([torch.randperm(EXPERTS, device="cuda")[:TOP_K] for _ in range(tokens)])
        entries, _, ends = kernels.sort_by_expert(experts, EXPERTS)

        rows = kernels.TokenRows(x, entries, TOP_K)
        gathered_ms, a = graph_ms(lambda r=rows, e=ends: triton_expert.grouped_swiglu(r.gather(), e, w_gate_up, w_down))
        in_loads_ms, b = graph_ms(lambda r=rows, e=ends: triton_expert.grouped_swiglu(r, e, w_gate_up, w_down))
        points.append(
            {"tokens": tokens, "gathered_ms": gathered_ms, "source_ms": in_loads_ms, "equal": bool(torch.equal(a, b))}
        )
        console.print(f"experts tokens {tokens:3}: gather+kernels {gathered_ms * 1e3:.1f} us, in loads "
                      f"{in_loads_ms * 1e3:.1f} us, equal {torch.equal(a, b)}")  # fmt: skip
    return points


def attention_points() -> list[dict[str, Any]]:
    points = []
    plan_args = {"num_qo_heads": HEADS, "num_kv_heads": KV_HEADS, "head_dim": DIM, "page_size": PAGE,
                 "q_data_type": BF16, "kv_data_type": BF16, "sm_scale": DIM**-0.5}  # fmt: skip
    num_pages = 256 * 8192 // PAGE + 8
    k_cache = torch.randn(num_pages, PAGE, KV_HEADS, DIM, device="cuda").to(BF16)
    v_cache = torch.randn_like(k_cache)
    for rows, context in [(1, 16), (1, 1024), (1, 8192), (1, 65536), (8, 16), (8, 1024), (8, 8192), (64, 1024),
                          (64, 8192), (256, 1024)]:  # fmt: skip
        pages = -(-context // PAGE)
        if rows * pages > num_pages:
            continue
        page_indices = torch.randperm(num_pages, device="cuda")[: rows * pages]
        meta = kernels.AttentionMetadata(
            [*range(rows + 1)], [b * pages for b in range(rows + 1)], page_indices, [context] * rows, PAGE, False
        )
        q = torch.randn(rows, HEADS, DIM, device="cuda").to(BF16)
        point: dict[str, Any] = {"rows": rows, "context": context}
        outs = {}
        for tensor_cores in (True, False):
            decode = flashinfer_attention.GraphDecode(rows, num_pages, plan_args, q.device, tensor_cores)
            decode.plan(meta)
            label = "tensor_cores" if tensor_cores else "cuda_cores"
            point[f"{label}_ms"], (outs[label], _) = graph_ms(lambda d=decode, q=q: d.run(q, k_cache, v_cache))
            point[f"{label}_no_lse_ms"], _ = graph_ms(lambda d=decode, q=q: d.output(q, k_cache, v_cache))
        point["rel_err"] = rel_err(outs["cuda_cores"], outs["tensor_cores"])
        console.print(f"decode rows {rows:3} x {context:5}: tensor cores {point['tensor_cores_ms'] * 1e3:.1f} "
                      f"({point['tensor_cores_no_lse_ms'] * 1e3:.1f} no lse) us, CUDA cores "
                      f"{point['cuda_cores_ms'] * 1e3:.1f} ({point['cuda_cores_no_lse_ms'] * 1e3:.1f}) us")  # fmt: skip
        points.append(point)
    return points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--only", nargs="*", default=["linear", "router", "experts", "attention"])
    args = parser.parse_args()
    torch.manual_seed(0)
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "timing": f"CUDA-graph replays, {TIMING}",
        "copy_bandwidth_bytes_per_s": copy_bandwidth(),
    }
    if "linear" in args.only:
        result["linear"] = linear_points()
    if "router" in args.only:
        result["router"] = router_points(Blocks(16, 128))
    if "experts" in args.only:
        result["experts"] = expert_points()
    if "attention" in args.only:
        result["attention"] = attention_points()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "decode_kernels_gpu.json"
    path.write_text(json.dumps(result, indent=1))
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
