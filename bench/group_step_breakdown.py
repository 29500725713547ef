"""Where a decode step's time goes in a group of N CPU instances: attention, MoE compute, MoE routing, the rest.

Each instance decodes its own batch of requests (data-parallel attention) and holds 1/N of the experts (every
layer's tokens are routed to their experts' holders and back). Steps are timed on every rank with host clocks; the
table shows the mean over decode steps (prefill steps left out) and over ranks. MoE routing includes the wait for
the slowest peer at each all-to-all, which is where a straggler's cost lands. Writes
bench/results/group_step_breakdown.json and a plot beside it.

    .venv/bin/python bench/group_step_breakdown.py [--sizes 1 2 4] [--batches 1 8 32]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import track
from rich.table import Table

from nanocp.harness.offline_group import OfflineRequest, RankResult, run_group
from nanocp.worker.engine import EngineConfig
from nanocp.worker.request import SamplingParams

RESULTS = Path(__file__).parent / "results"
SECTIONS = ("attention", "moe_compute", "moe_route")


def breakdown(results: list[RankResult]) -> dict[str, float]:
    """Mean milliseconds per decode step, over steps and ranks; the first step (prefill) is left out."""
    per_rank = []
    for r in results:
        steps = r.steps[1:]
        row = {name: statistics.mean(s.sections.get(name, 0.0) for s in steps) for name in SECTIONS}
        row["step"] = statistics.mean(s.seconds for s in steps)
        row["other"] = row["step"] - sum(row[name] for name in SECTIONS)
        per_rank.append(row)
    return {k: 1000 * statistics.mean(row[k] for row in per_rank) for k in (*SECTIONS, "other", "step")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32], help="requests per instance")
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--out", type=Path, default=RESULTS / "group_step_breakdown.json")
    args = parser.parse_args()

    config = EngineConfig(page_size=16, num_pages=4096, max_step_tokens=16384, max_running=max(args.batches))
    params = SamplingParams(temperature=0.0, max_tokens=args.new_tokens, ignore_eos=True)
    generator = torch.Generator().manual_seed(0)
    rows = []
    points = [(n, b) for n in args.sizes for b in args.batches]
    for size, batch in track(points, description="group sizes x batches"):
        requests = [
            [
                OfflineRequest(
                    f"r{rank}-{i}", torch.randint(0, 256, (args.prompt_tokens,), generator=generator).tolist(), params
                )
                for i in range(batch)
            ]
            for rank in range(size)
        ]
        results = run_group(args.model, config, requests, timing=True, timeout_s=600)
        rows.append({"instances": size, "batch_per_instance": batch, "ms_per_step": breakdown(results)})

    result = {
        "benchmark": "decode step breakdown of a CPU decode group (one process per instance, gloo)",
        "model": args.model,
        "device": "cpu",
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "threads_per_rank": 1},
        "torch": torch.__version__,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    plot(rows, args.out.with_suffix(".png"))
    table = Table(
        "instances", "batch/inst", *[f"{s} ms" for s in (*SECTIONS, "other")], "step ms", title=result["benchmark"]
    )
    for row in rows:
        ms = row["ms_per_step"]
        table.add_row(
            str(row["instances"]),
            str(row["batch_per_instance"]),
            *[f"{ms[k]:.2f}" for k in (*SECTIONS, "other", "step")],
        )
    Console(width=120).print(table)
    print(f"wrote {args.out}")


def plot(rows: list[dict], path: Path) -> None:  # type: ignore[type-arg]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"N={r['instances']}\nB={r['batch_per_instance']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, len(rows) * 0.8), 4))
    bottom = [0.0] * len(rows)
    for name in (*SECTIONS, "other"):
        values = [r["ms_per_step"][name] for r in rows]
        ax.bar(labels, values, bottom=bottom, label=name.replace("_", " "))
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.set_ylabel("ms per decode step")
    ax.set_title("decode step breakdown, CPU group (gloo)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
