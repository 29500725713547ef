"""Which kernel runs the experts on the GPU: the MoE expert computation (SwiGLU experts on rows grouped by expert) of
the Qwen3-30B-A3B shapes (hidden 2048, expert width 768, 128 experts, top-8, bf16) at several token counts.

Variants: a torch loop over the active experts (the reference implementation), torch._grouped_mm (two grouped GEMMs,
the GPU path of kernels.grouped_swiglu above gpu_moe.TRITON_MAX_ROWS rows), the Triton expert kernels
(triton_expert.py, the path up to that many rows; with --triton-blocks, also each given tile choice) and a padded
batched GEMM over all experts (torch.bmm, rows padded to the busiest expert). Each row is checked against the
float32 loop on the same bf16 inputs. Times are medians of triton.testing.do_bench (L2 flushed each call), of eager
calls and of CUDA-graph replays (grouped_mm and Triton with their group ends already on the device, as a graph will
hold them); the weight bandwidth is the active experts' weight bytes over the time, as a fraction of a
device-to-device copy measured in the same run. Writes bench/results/moe_kernels.json (or --out) and a plot beside
it.

    python3 bench/moe_kernels.py [--tokens 1 4 16 64 256 1024 4096] [--triton-blocks 16x128x4x4/32x128x4x4 ...]
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
from rich.table import Table

from nanocp.kernels import gpu_moe, triton_expert
from nanocp.kernels.moe import reference_grouped_swiglu

RESULTS = Path(__file__).parent / "results"
HIDDEN, WIDTH, EXPERTS, TOP_K = 2048, 768, 128, 8
Variant = Callable[[torch.Tensor, list[int], torch.Tensor, torch.Tensor], torch.Tensor]
ByEnds = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def on_ends(by_ends: ByEnds, ends: torch.Tensor) -> tuple[Variant, Variant]:
    """(eager: the ends copied to the device per call as kernels.grouped_swiglu does, graphed: the ends already on
    the device, as a graph holds them)."""

    def eager(x: torch.Tensor, counts: list[int], w_gate_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
        return by_ends(x, gpu_moe.device_ends(counts, x.device), w_gate_up, w_down)

    return eager, lambda x, _, w_gate_up, w_down: by_ends(x, ends, w_gate_up, w_down)


def parse_blocks(text: str) -> tuple[triton_expert.Blocks, triton_expert.Blocks]:
    """'16x128x4x4/32x128x4x4': gate/up then down tiles as columns x K [x warps x stages]."""
    gate_up, down = (triton_expert.Blocks(*map(int, part.split("x"))) for part in text.split("/"))
    return gate_up, down


def triton_variant(gate_up: triton_expert.Blocks, down: triton_expert.Blocks) -> ByEnds:
    def run(x: torch.Tensor, ends: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
        return triton_expert.grouped_swiglu(x, ends, w_gate_up, w_down, (gate_up, down))

    return run


def blocks_name(gate_up: triton_expert.Blocks, down: triton_expert.Blocks) -> str:
    return "/".join("x".join(map(str, b)) for b in (gate_up, down))


def padded_bmm(counts: list[int]) -> Variant:
    """Rows scattered into an (experts, busiest, hidden) block, two bmm over every expert, gathered back; the
    scatter indices are made once, as a per-step plan would."""
    expert = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts)).cuda()
    starts = torch.tensor([0, *counts]).cumsum(0)[:-1].cuda()
    position = torch.arange(len(expert), device="cuda") - starts[expert]
    busiest = max(counts)

    def run(x: torch.Tensor, _: list[int], w_gate_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
        block = x.new_zeros(len(counts), busiest, x.shape[1])
        block[expert, position] = x
        gate, up = torch.bmm(block, w_gate_up.transpose(1, 2)).chunk(2, dim=-1)
        return torch.bmm(F.silu(gate) * up, w_down.transpose(1, 2))[expert, position]

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 16, 64, 256, 1024, 4096])
    parser.add_argument("--out", type=Path, default=RESULTS / "moe_kernels.json")
    parser.add_argument(
        "--triton-blocks", nargs="*", default=[], help="more Triton tiles to time, as gate_up/down NxK[xWARPSxSTAGES]"
    )
    args = parser.parse_args()
    tiles = [parse_blocks(text) for text in args.triton_blocks]

    torch.manual_seed(0)
    copy_bw = copy_bandwidth()
    w_gate_up = (torch.randn(EXPERTS, 2 * WIDTH, HIDDEN, device="cuda") * HIDDEN**-0.5).to(torch.bfloat16)
    w_down = (torch.randn(EXPERTS, HIDDEN, WIDTH, device="cuda") * WIDTH**-0.5).to(torch.bfloat16)
    expert_bytes = (w_gate_up[0].numel() + w_down[0].numel()) * w_gate_up.element_size()
    rows = []
    for tokens in args.tokens:
        chosen = torch.rand(tokens, EXPERTS, device="cuda").topk(TOP_K, dim=-1).indices.flatten()
        counts = torch.bincount(chosen, minlength=EXPERTS).tolist()
        x = torch.randn(tokens * TOP_K, HIDDEN, device="cuda").to(torch.bfloat16)
        ref = reference_grouped_swiglu(x.float(), counts, w_gate_up.float(), w_down.float())
        active = sum(c > 0 for c in counts)
        flops = 2 * tokens * TOP_K * 3 * HIDDEN * WIDTH
        ends = torch.tensor(counts, device="cuda").cumsum(0).to(torch.int32)
        padded = padded_bmm(counts)
        variants: dict[str, tuple[Variant, Variant]] = {  # (eager, graphed)
            "loop": (reference_grouped_swiglu, reference_grouped_swiglu),
            "grouped_mm": on_ends(gpu_moe.grouped_mm_swiglu, ends),
            "triton": on_ends(triton_expert.grouped_swiglu, ends),
            **{f"triton {blocks_name(*t)}": on_ends(triton_variant(*t), ends) for t in tiles},
            "padded_bmm": (padded, padded),
        }
        row: dict[str, Any] = {"tokens": tokens, "rows": tokens * TOP_K, "active_experts": active, "variants": {}}
        for name, (eager, in_graph) in variants.items():
            out = eager(x, counts, w_gate_up, w_down)
            replay, replayed = graphed(lambda f=in_graph, x=x, counts=counts: f(x, counts, w_gate_up, w_down))
            replay()
            ms = {
                "eager": bench_ms(lambda f=eager, x=x, counts=counts: f(x, counts, w_gate_up, w_down)),
                "graph": bench_ms(replay),
            }
            row["variants"][name] = {
                "ms": ms,
                "weight_bw_fraction": {mode: active * expert_bytes / (t / 1e3) / copy_bw for mode, t in ms.items()},
                "tflops": {mode: flops / (t / 1e3) / 1e12 for mode, t in ms.items()},
                "rel_err": ((out.float() - ref).norm() / ref.norm()).item(),
                "rel_err_graph": ((replayed.float() - ref).norm() / ref.norm()).item(),
            }
        rows.append(row)
        print(f"tokens {tokens}: " + ", ".join(f"{n} {v['ms']}" for n, v in row["variants"].items()), flush=True)

    result = {
        "benchmark": "MoE expert computation (SwiGLU, rows grouped by expert), Qwen3-30B-A3B expert shapes",
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "shapes": {"hidden": HIDDEN, "width": WIDTH, "experts": EXPERTS, "top_k": TOP_K, "dtype": "bfloat16"},
        "copy_bandwidth_bytes_per_s": copy_bw,
        "triton_max_rows": gpu_moe.TRITON_MAX_ROWS,
        "triton_blocks": f"{blocks_name(triton_expert.GATE_UP_BLOCKS, triton_expert.DOWN_BLOCKS)}; up to "
        f"{triton_expert.FEW_ROWS} rows "
        f"{blocks_name(triton_expert.FEW_ROWS_GATE_UP_BLOCKS, triton_expert.FEW_ROWS_DOWN_BLOCKS)}",
        "timing": f"{TIMING}; eager calls, and replays of a CUDA graph of the same call",
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out.with_suffix(".png"))
    names = list(rows[0]["variants"])
    table = Table(
        "tokens",
        "active experts",
        *[f"{n} ms (weight bw)" for n in names],
        *[f"{n} eager ms" for n in names],
        "rel err (max)",
        title=f"{result['benchmark']}, {result['device']}, copy {copy_bw / 1e12:.2f} TB/s; graph replays unless eager",
    )
    for row in rows:
        v = row["variants"]
        table.add_row(
            str(row["tokens"]),
            str(row["active_experts"]),
            *[f"{v[n]['ms']['graph']:.3f} ({v[n]['weight_bw_fraction']['graph']:.0%})" for n in names],
            *[f"{v[n]['ms']['eager']:.3f}" for n in names],
            f"{max(max(v[n]['rel_err'], v[n]['rel_err_graph']) for n in names):.1e}",
        )
    Console(width=200).print(table)
    print(f"wrote {args.out}")


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    tokens = [r["tokens"] for r in rows]
    for i, name in enumerate(rows[0]["variants"]):
        for mode, style in (("graph", "-"), ("eager", ":")):
            ms = [r["variants"][name]["ms"][mode] for r in rows]
            left.plot(tokens, ms, style, color=f"C{i}", marker="o", label=f"{name} {mode}")
        bw = [100 * r["variants"][name]["weight_bw_fraction"]["graph"] for r in rows]
        right.plot(tokens, bw, color=f"C{i}", marker="o", label=name)
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens (x top-8 rows)")
        ax.legend()
    left.set_yscale("log")
    left.set_ylabel("ms per MoE layer (experts only)")
    left.set_title(f"expert kernels, {result['device']}")
    right.set_ylabel("active expert weight bytes / time, % of copy bandwidth")
    right.set_title("weight bandwidth (graph replays)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
