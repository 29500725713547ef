"""A prefill chunk's attention on one GPU by FlashInfer backend and KV layout (Qwen3-30B-A3B heads: 32 query, 4 KV,
dim 128, bf16): the paged cache at two page sizes (what the engine reads today) against the chunk's own K, V as
ragged tensors (what a chunk without cached prefix could read: dense, so FlashAttention-3 loads it by TMA), for
FlashAttention-2 and -3. Causal, each prompt one segment, whole prompts in the chunk.

Writes bench/results/prefill_attention_gpu.json (or --out).

    python3 bench/prefill_attention_gpu.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from gpu_timing import TIMING, bench_ms

RESULTS = Path(__file__).parent / "results"
HEADS, KV_HEADS, DIM = 32, 4, 128
WORKSPACE_BYTES = 128 << 20
SHAPES = ((2, 8192), (1, 16384), (4, 4096), (16, 1024))  # (prompts, tokens each): one 16K-token chunk


def causal_flops(prompts: int, tokens: int) -> float:
    """QK^T and PV over the causal half of each prompt's square, 2 FLOPs a multiply-add."""
    return prompts * 4.0 * HEADS * DIM * tokens * (tokens + 1) / 2


def time_layouts(prompts: int, tokens: int, workspace: torch.Tensor) -> dict[str, float]:
    """ms of one chunk's attention for each (layout, backend)."""
    import flashinfer

    rows = prompts * tokens
    q = torch.randn(rows, HEADS, DIM, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(rows, KV_HEADS, DIM, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    qo_indptr = torch.arange(0, rows + 1, tokens, dtype=torch.int32)
    common = {"causal": True, "q_data_type": torch.bfloat16, "kv_data_type": torch.bfloat16}
    ms = {}
    ragged = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(workspace, "NHD", backend="fa3")
    ragged.plan(qo_indptr, qo_indptr, HEADS, KV_HEADS, DIM, **common)
    ms["ragged fa3"] = bench_ms(lambda: ragged.run(q, k, v))
    for backend in ("fa2", "fa3"):  # FlashAttention-2's ragged kernels: not built here (the engine has no use yet)
        for page in (16, 64):
            pages = rows // page
            # Pages in shuffled order, as a long-running pool hands them out.
            order = torch.randperm(pages, device="cuda")
            cache = [torch.empty(pages, page, KV_HEADS, DIM, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
            cache[0][order] = k.view(pages, page, KV_HEADS, DIM)
            cache[1][order] = v.view(pages, page, KV_HEADS, DIM)
            paged = flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD", backend=backend)
            per_prompt = tokens // page
            paged.plan(
                qo_indptr,
                torch.arange(0, pages + 1, per_prompt, dtype=torch.int32),
                order.to(torch.int32),
                torch.full((prompts,), page, dtype=torch.int32),
                HEADS,
                KV_HEADS,
                DIM,
                page,
                **common,
            )
            ms[f"paged {page} {backend}"] = bench_ms(lambda w=paged, c=cache: w.run(q, (c[0], c[1])))
    return ms


def run(out: Path) -> dict[str, Any]:
    workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device="cuda")
    points = []
    for prompts, tokens in SHAPES:
        ms = time_layouts(prompts, tokens, workspace)
        flops = causal_flops(prompts, tokens)
        points.append({"prompts": prompts, "tokens": tokens, "ms": ms,
                       "tflops": {name: flops / t / 1e9 for name, t in ms.items()}})  # fmt: skip
        print(f"{prompts} x {tokens}: " + ", ".join(f"{n} {t:.3f} ms" for n, t in ms.items()), flush=True)
    result = {"device": torch.cuda.get_device_name(), "timing": TIMING, "points": points}
    out.mkdir(parents=True, exist_ok=True)
    (out / "prefill_attention_gpu.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=RESULTS)
    run(parser.parse_args().out)


if __name__ == "__main__":
    main()
