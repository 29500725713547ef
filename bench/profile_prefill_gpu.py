"""Where a prefill step's time goes on one GPU (Qwen3-30B-A3B shapes, random bf16 weights): for each per-step token
budget (the engine's chunk size), the prefill rate of prompts of one length; a step's kernels by total time, grouped
as attention, experts, projections and the rest, and the device's idle time between kernels with the longest gaps
(three steps under the torch profiler); the host's functions by cumulative time a step (cProfile, on prefills of
their own). And the QK-norm + rotary kernel (storing K, V) alone at 1 to 16K tokens with 1 to 16 heads a program
(`--head-blocks`; one layer's call in a graph).

Each prompt asks for one token, so the timed steps are prefill chunks alone; with --decode-tokens N each asks for N,
so later prompts' chunks run beside the decodes of the prompts prefilled before them, as in a serving engine and in
bench/gpu_decode_step.py's prefill rate (the rate is taken until the last prompt is prefilled; the rest are ended).
Writes bench/results/profile_prefill_gpu.json (or --out).

    python3 bench/profile_prefill_gpu.py [--context 8192] [--prompts 16] [--budgets 16384,32768] [--out DIR]
        [--head-blocks 1,8] [--decode-tokens 1]
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import json
import time
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from gpu_decode_step import prefill_flops
from gpu_timing import TIMING, bench_ms, graphed, idle_gaps
from prefill_rate_gpu import end_all, seconds_to_prefill
from profile_decode_gpu import top_functions

from nanocp.kernels import triton_norm_rope
from nanocp.model_config import load_model_config
from nanocp.sim.hardware import DEVICES
from nanocp.worker.engine import Engine, EngineConfig
from nanocp.worker.model import Rotary
from nanocp.worker.request import SamplingParams
from nanocp.worker.weights import build_model

RESULTS = Path(__file__).parent / "results"
PAGE = 16
# Kernel name fragments, first match wins: the part of the model a kernel belongs to.
PARTS = (
    ("attention", ("flashinfer", "prefill", "attention", "fmha", "merge")),
    ("experts (grouped GEMM)", ("grouped", "cutlass", "gemm_grouped", "silu")),
    ("projections (GEMM)", ("nvjet", "gemm", "sm90_xmma", "cublas", "_small_linear")),
    ("router top-k and sort", ("route_topk", "sort", "tile_kernel", "scan", "radix", "index_copy", "searchsorted")),
    ("norms and rotary", ("norm", "rope")),
)


def part_of(kernel: str) -> str:
    name = kernel.lower()
    return next((part for part, keys in PARTS if any(key in name for key in keys)), "other")


@dataclass(frozen=True)
class Prompts:
    """What is prefilled: prompts of `context` random tokens, each asking for `decode_tokens` tokens."""

    context: int
    decode_tokens: int
    vocab: int
    generator: torch.Generator

    def add(self, engine: Engine, prompts: int) -> None:
        params = SamplingParams(temperature=0, max_tokens=self.decode_tokens, ignore_eos=True)
        for i in range(prompts):
            prompt = torch.randint(0, self.vocab, (self.context,), generator=self.generator).tolist()
            engine.add_request(f"p{time.monotonic_ns()}-{i}", prompt, params, lambda _: None)
        torch.cuda.synchronize()


def prefill(engine: Engine, prompts: Prompts, count: int) -> float:
    """Seconds to prefill `count` prompts from an idle engine (which is idle again afterwards)."""
    prompts.add(engine, count)
    seconds = seconds_to_prefill(engine)
    end_all(engine)
    return seconds


def profile_steps(engine: Engine, prompts: Prompts, budget: int) -> dict[str, Any]:
    """Prefill steps of three steps' prompts under the torch profiler (beside the decodes of two steps' prompts
    prefilled before, when prompts decode): a step's kernels by name and by part, and the time the device idles
    between kernels (us a step), with the longest gaps and the kernels either side of each."""
    steps = 3
    if prompts.decode_tokens > 1:
        prompts.add(engine, 2 * -(-budget // prompts.context))
        seconds_to_prefill(engine)
    prompts.add(engine, steps * budget // prompts.context)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        seconds_to_prefill(engine)
    end_all(engine)
    kernels: collections.Counter[str] = collections.Counter()
    spans = []
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            kernels[event.name] += event.device_time / steps
            spans.append((event.time_range.start, event.time_range.end, event.name[:80]))
    gaps = idle_gaps(spans)
    parts: collections.Counter[str] = collections.Counter()
    for name, us in kernels.items():
        parts[part_of(name)] += us
    return {
        "device_us": sum(kernels.values()),
        "idle_us": sum(g["us"] for g in gaps) / steps,
        "longest_gaps": sorted(gaps, key=lambda g: -g["us"])[:10],
        "parts_us": dict(parts.most_common()),
        "kernels_us": [{"kernel": name[:120], "us": us} for name, us in kernels.most_common(25)],
    }


def norm_rope_points(head_blocks: list[int]) -> list[dict[str, Any]]:
    """us a call of the QK-norm + rotary kernel storing K and V (the model's call), Qwen3-30B-A3B heads."""
    heads, kv_heads, dim, pages = 32, 4, 128, 2048
    bf16: dict[str, Any] = {"device": "cuda", "dtype": torch.bfloat16}
    rotary = Rotary(dim, 1e6, 8192).cuda()
    rotary.reset()
    weights = (torch.ones(dim, device="cuda", dtype=torch.bfloat16),) * 2
    caches = [torch.zeros(pages, PAGE, kv_heads, dim, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    points = []
    for tokens in (1, 64, 256, 512, 2048, 16384):
        qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, device="cuda").to(torch.bfloat16)
        positions = torch.randint(0, 8192, (tokens,), device="cuda")
        store = (caches[0], caches[1], torch.randperm(pages * PAGE, device="cuda")[:tokens])
        out = (torch.empty(tokens, heads, dim, **bf16), torch.empty(tokens, kv_heads, dim, **bf16))
        us = {}
        for block in head_blocks:
            call = partial(triton_norm_rope.qk_norm_rope_into, qkv, positions, weights, (rotary.cos, rotary.sin), 1e-6)
            replay, _ = graphed(partial(call, out, store, head_block=block))
            us[block] = 1e3 * bench_ms(replay)
        moved = qkv.numel() * 2 + (out[0].numel() + 3 * out[1].numel()) * 2  # read qkv; write q, k, K and V
        points.append({"tokens": tokens, "us_by_head_block": us, "bytes": moved})
        print(f"qk-norm-rope {tokens:5} tokens: " + ", ".join(f"{b}: {t:.1f} us" for b, t in us.items()), flush=True)
    return points


def run(
    context: int, count: int, budgets: list[int], head_blocks: list[int], decode_tokens: int, out: Path
) -> dict[str, Any]:
    norm_rope = norm_rope_points(head_blocks)
    config = replace(load_model_config("qwen3-30b-a3b", dtype="bfloat16"), max_context=context + decode_tokens + 64)
    model = build_model(config, "cuda", seed=0)
    flops = prefill_flops(config, context)
    peak = DEVICES["h200"].flops
    prompts = Prompts(context, decode_tokens, config.vocab_size, torch.Generator().manual_seed(0))
    rows = []
    for budget in budgets:
        engine_config = EngineConfig(
            page_size=PAGE,
            num_pages=count * -(-(context + decode_tokens) // PAGE) + 64,
            max_step_tokens=budget,
            max_running=min(budget, 256),
            device="cuda",
            dtype="bfloat16",
            cuda_graphs=False,
        )
        engine = Engine(config, model, engine_config)
        prefill(engine, prompts, -(-budget // context))  # warm-up: JIT, allocator
        seconds = prefill(engine, prompts, count)
        row: dict[str, Any] = {
            "budget": budget,
            "context": context,
            "prompts": count,
            "decode_tokens": decode_tokens,
            "seconds": seconds,
            "tokens_per_s": count * context / seconds,
            "mfu": count * flops / seconds / peak,
            "step": profile_steps(engine, prompts, budget),
        }
        host_profile = cProfile.Profile()  # on prefills of their own: the profiler slows the host it measures
        host_profile.enable()
        profiled = 2 * -(-budget // context)  # prompts: two steps' worth
        prefill(engine, prompts, profiled)
        host_profile.disable()
        row["host_functions"] = top_functions(host_profile, steps=-(-profiled * context // budget))
        print(f"budget {budget}: {row['tokens_per_s']:.0f} tokens/s, MFU {row['mfu']:.1%}", flush=True)
        print(f"    device idle {row['step']['idle_us'] / 1e3:.2f} ms a step; longest gaps:", flush=True)
        for gap in row["step"]["longest_gaps"]:
            print(f"    {gap['us'] / 1e3:9.2f} ms  after {gap['after']} before {gap['before']}", flush=True)
        for part, us in row["step"]["parts_us"].items():
            print(f"    {us / 1e3:9.2f} ms  {part}", flush=True)
        for kernel in row["step"]["kernels_us"][:12]:
            print(f"    {kernel['us'] / 1e3:9.2f} ms  {kernel['kernel']}", flush=True)
        for function in row["host_functions"][:25]:
            print(f"    host {function['ms_per_step']:8.2f} ms  {function['function']}", flush=True)
        rows.append(row)
        del engine
        torch.cuda.empty_cache()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "points": rows,
              "norm_rope_timing": TIMING, "norm_rope": norm_rope}  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile_prefill_gpu.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--budgets", default="16384,32768", help="per-step token budgets, comma-separated")
    parser.add_argument("--head-blocks", default="1,2,4,8,16", help="heads a program for the QK-norm kernel's sweep")
    parser.add_argument("--decode-tokens", type=int, default=1, help="tokens each prompt asks for")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    budgets, blocks = ([int(b) for b in arg.split(",")] for arg in (args.budgets, args.head_blocks))
    run(args.context, args.prompts, budgets, blocks, args.decode_tokens, args.out)


if __name__ == "__main__":
    main()
