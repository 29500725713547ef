"""Attention over each request's KV split into k = 1, 2, 4, 8 shards plus the merge, against unsplit attention, on
one GPU: the overhead that context parallelism's holder-and-home pair pays for splitting (communication aside).

Decode rows (one query per request) of the Qwen3-30B-A3B attention shapes (32 query / 4 KV heads of 128, bf16 KV in
pages of 16), over contexts 1K..64K and a few batch sizes. Per point: the unsplit call; for each k, one shard's call
(what each holder pays, in parallel on its own GPU), the merge of k partial states, and all k shards run one after
the other plus the stack and merge (the split's total work on one GPU). Times are medians of
triton.testing.do_bench (CUDA events, L2 flushed before each call), of eager calls (host and launch gaps included,
as the engine runs today) and of replays of a CUDA graph of the same calls (the device's own time, as the engine's
graphs will run it; the plans are fixed, so replays are valid). plan() runs once a step on the host and is left
out. KV bandwidth = KV bytes read / time, as a fraction of a device-to-device copy measured in the same run (bytes
read + written). Writes bench/results/cp_attention_split.json and a plot beside it.

    python3 bench/cp_attention_split.py [--contexts 1024 4096 16384 65536] [--batches 1 8 32 64]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from gpu_timing import TIMING, bench_ms, copy_bandwidth, graphed
from rich.console import Console
from rich.table import Table

from nanocp import kernels

RESULTS = Path(__file__).parent / "results"
PAGE, HEADS, KV_HEADS, DIM = 16, 32, 4, 128
SCALE = DIM**-0.5
SPLITS = (2, 4, 8)
LN2 = math.log(2.0)


def shard_meta(table: torch.Tensor, first: int, last: int) -> kernels.AttentionMetadata:
    """One decode row per request over pages [first, last) of each request's page table (batch, pages)."""
    batch, pages = table.shape[0], last - first
    return kernels.AttentionMetadata(
        list(range(batch + 1)),
        [b * pages for b in range(batch + 1)],
        table[:, first:last].reshape(-1),
        [pages * PAGE] * batch,
        PAGE,
        causal=True,
    )


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def flashinfer_merge(outputs: torch.Tensor, lses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FlashInfer's merge as the interface would call it: natural log to base 2 and back, and its (rows, parts, ...)
    layout for more than two parts. Compared with kernels.merge_states (one Triton launch)."""
    import flashinfer

    base2 = lses / LN2
    if outputs.shape[0] == 2:
        o, s = flashinfer.merge_state(outputs[0], base2[0], outputs[1], base2[1])
    else:
        o, s = flashinfer.merge_states(outputs.transpose(0, 1).contiguous(), base2.transpose(0, 1).contiguous())
    return o, s.mul_(LN2)


def timed(fn: Callable[[], Any]) -> dict[str, float]:
    """Milliseconds per call, eager and replayed from a CUDA graph."""
    replay, _ = graphed(fn)
    return {"eager": bench_ms(fn), "graph": bench_ms(replay)}


def measure(context: int, batch: int, k_cache: torch.Tensor, v_cache: torch.Tensor, copy_bw: float) -> dict[str, Any]:
    pages = context // PAGE
    table = torch.randperm(k_cache.shape[0], device="cuda")[: batch * pages].view(batch, pages)
    q = torch.randn(batch, HEADS, DIM, device="cuda", dtype=torch.bfloat16)
    kv_bytes = batch * context * KV_HEADS * DIM * 2 * k_cache.element_size()

    def attend(meta: kernels.AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        return kernels.paged_attention(q, k_cache, v_cache, meta, SCALE)

    whole = shard_meta(table, 0, pages)
    expected, _ = attend(whole)
    unsplit = timed(lambda: attend(whole))
    row: dict[str, Any] = {
        "context": context,
        "batch": batch,
        "kv_bytes": kv_bytes,
        "unsplit_ms": unsplit,
        "unsplit_kv_bw_fraction": {mode: kv_bytes / (ms / 1e3) / copy_bw for mode, ms in unsplit.items()},
        "splits": {},
    }
    for k in SPLITS:
        metas = [shard_meta(table, j * pages // k, (j + 1) * pages // k) for j in range(k)]

        def split_and_merge(metas: list[kernels.AttentionMetadata] = metas) -> tuple[torch.Tensor, torch.Tensor]:
            partials = [attend(m) for m in metas]
            return kernels.merge_states(torch.stack([o for o, _ in partials]), torch.stack([s for _, s in partials]))

        partials = [attend(m) for m in metas]
        outputs, lses = torch.stack([o for o, _ in partials]), torch.stack([s for _, s in partials])
        merged, _ = split_and_merge()
        replay, (replayed, _) = graphed(split_and_merge)
        replay()
        shard = timed(lambda metas=metas: attend(metas[0]))
        merge = timed(lambda outputs=outputs, lses=lses: kernels.merge_states(outputs, lses))
        merge_flashinfer = timed(lambda outputs=outputs, lses=lses: flashinfer_merge(outputs, lses))
        fi_out, fi_lse = flashinfer_merge(outputs, lses)
        ours, ours_lse = kernels.merge_states(outputs, lses)
        total = timed(split_and_merge)
        row["splits"][str(k)] = {
            "shard_ms": shard,
            "merge_ms": merge,
            "merge_flashinfer_ms": merge_flashinfer,
            "merge_flashinfer_max_diff": {
                "o": (fi_out.float() - ours.float()).abs().max().item(),
                "lse": (fi_lse - ours_lse).abs().max().item(),
            },
            "split_total_ms": total,
            "split_overhead": {mode: total[mode] / unsplit[mode] - 1 for mode in total},
            # one shard per GPU in parallel, then the merge at home
            "critical_path_ms": {mode: shard[mode] + merge[mode] for mode in shard},
            "rel_err_vs_unsplit": rel_err(merged, expected),
            "graph_replay_equals_eager": torch.equal(replayed, merged),
        }
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--out", type=Path, default=RESULTS / "cp_attention_split.json")
    args = parser.parse_args()

    import flashinfer

    torch.manual_seed(0)
    copy_bw = copy_bandwidth()
    num_pages = max(args.batches) * max(args.contexts) // PAGE
    k_cache = torch.randn(num_pages, PAGE, KV_HEADS, DIM, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    rows = []
    for context in args.contexts:
        for batch in args.batches:
            rows.append(measure(context, batch, k_cache, v_cache, copy_bw))
            print(f"context {context} batch {batch}: unsplit {rows[-1]['unsplit_ms']}", flush=True)

    result = {
        "benchmark": "decode attention over KV split into k shards plus merge, vs unsplit (one GPU)",
        "device": torch.cuda.get_device_name(),
        "host": platform.node(),
        "torch": torch.__version__,
        "flashinfer": flashinfer.__version__,
        "shapes": {"heads": HEADS, "kv_heads": KV_HEADS, "head_dim": DIM, "page_size": PAGE, "dtype": "bfloat16"},
        "copy_bandwidth_bytes_per_s": copy_bw,
        "timing": f"{TIMING}; eager calls, and replays of a CUDA graph of the same calls; plan() left out",
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out.with_suffix(".png"))
    table = Table(
        "context",
        "batch",
        "unsplit ms",
        "KV bw",
        *[f"k={k} total ms (+ovh)" for k in SPLITS],
        *[f"k={k} shard+merge ms" for k in SPLITS],
        *[f"k={k} eager total (+ovh)" for k in SPLITS],
        title=f"{result['benchmark']}, {result['device']}, copy {copy_bw / 1e12:.2f} TB/s; graph replays unless eager",
    )
    for row in rows:
        splits = [row["splits"][str(k)] for k in SPLITS]
        table.add_row(
            str(row["context"]),
            str(row["batch"]),
            f"{row['unsplit_ms']['graph']:.3f}",
            f"{row['unsplit_kv_bw_fraction']['graph']:.0%}",
            *[f"{s['split_total_ms']['graph']:.3f} ({s['split_overhead']['graph']:+.0%})" for s in splits],
            *[f"{s['shard_ms']['graph']:.3f}+{s['merge_ms']['graph']:.3f}" for s in splits],
            *[f"{s['split_total_ms']['eager']:.3f} ({s['split_overhead']['eager']:+.0%})" for s in splits],
        )
    Console(width=240).print(table)
    merges = Table(
        "batch",
        *[f"k={k} merge ms: kernels / FlashInfer" for k in SPLITS],
        title="merge of k partial states (independent of context; at the first context), graph replays (eager)",
    )
    for row in rows:
        if row["context"] == rows[0]["context"]:
            cells = []
            for s in (row["splits"][str(k)] for k in SPLITS):
                ours, theirs = s["merge_ms"], s["merge_flashinfer_ms"]
                cells.append(
                    f"{ours['graph']:.4f} / {theirs['graph']:.4f} ({ours['eager']:.4f} / {theirs['eager']:.4f})"
                )
            merges.add_row(str(row["batch"]), *cells)
    Console(width=240).print(merges)
    print(f"wrote {args.out}")


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    batches = sorted({r["batch"] for r in rows})
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for batch, style in zip((batches[0], batches[-1]), ("--", "-"), strict=True):
        points = [r for r in rows if r["batch"] == batch]
        for k in SPLITS:
            left.plot(
                [r["context"] for r in points],
                [100 * r["splits"][str(k)]["split_overhead"]["graph"] for r in points],
                style,
                marker="o",
                label=f"k={k}, batch {batch}",
            )
    left.set_xscale("log", base=2)
    left.set_xlabel("context (tokens)")
    left.set_ylabel("split total + merge over unsplit (%)")
    left.set_title("k shards + merge over unsplit, one GPU (graph replays)")
    left.legend(fontsize=8)
    for batch in batches:
        points = [r for r in rows if r["batch"] == batch]
        right.plot(
            [r["context"] for r in points],
            [100 * r["unsplit_kv_bw_fraction"]["graph"] for r in points],
            marker="o",
            label=f"batch {batch}",
        )
    right.set_xscale("log", base=2)
    right.set_xlabel("context (tokens)")
    right.set_ylabel("KV bytes / time, % of copy bandwidth")
    right.set_title("unsplit decode attention (graph replays)")
    fig.suptitle(f"{result['device']}, Qwen3-30B-A3B attention shapes, bf16 KV")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
