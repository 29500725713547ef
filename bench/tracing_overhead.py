"""Decode step time of a CPU decode group with step tracing on and off, alternating in blocks of steps in one run.

A group of N tiny-model instances (one process each, gloo) decodes a long batch with tracing on (spans exported
through a BatchSpanProcessor into memory; a serving worker's OTLP exporter serialises and sends from that same
background thread), but the tracer is told only of the steps of every other block of BLOCK steps. So tracing on and
off run in the same processes, on the same cores, at the same batch. A step's cost is the time from its start to
the next step's start (StepRecord.started): everything it costs, the spans built after its record included; in
lockstep one member's tracing shows in every member's steps. Steps slow down as the KV grows, so each traced block
is compared with the mean of the untraced blocks on either side of it (which cancels a steady trend), by their
median step costs over all ranks. Two runs a round: one tracing at the default sampling (every 64th step: one step
in each traced block), one tracing every step. The figure per arm is the median of those comparisons, pooled over
runs and per run.

Beside that A/B, the tracer's own cost, which no noise blurs: the time rank 0's step tracer takes per step (it
emits the group span as well as its own, with links to eight requests), timed over many steps in this process, as
a share of the median step. Writes bench/results/tracing_overhead.json (or --out) and, where matplotlib is, a plot.

    .venv/bin/python bench/tracing_overhead.py [--instances 2] [--rounds 4] [--new-tokens 768]
    .venv/bin/python bench/tracing_overhead.py --plot bench/results/tracing_overhead.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import torch
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanContext, TraceFlags
from rich.console import Console
from rich.progress import track
from rich.table import Table

from nanocp.harness.offline_group import OfflineRequest, RankResult, run_group
from nanocp.telemetry import STEP_SPANS_EVERY, AgreedIds
from nanocp.worker.engine import Engine, EngineConfig, StepObserver
from nanocp.worker.request import Request, SamplingParams
from nanocp.worker.scheduler import Chunk
from nanocp.worker.step_trace import GroupMember, StepTracer
from nanocp.worker.timing import StepRecord, Straggler

RESULTS = Path(__file__).parent / "results"
ARMS = {f"every {STEP_SPANS_EVERY}th step (default)": STEP_SPANS_EVERY, "every step": 1}
BLOCK = 64  # steps; odd blocks are traced, even ones not; block 0 (prefill, warm-up) is left out


def traced(step: int) -> bool:
    return (step // BLOCK) % 2 == 1


class Alternating:
    """Tells the engine's step tracer of the steps of traced blocks only."""

    def __init__(self, inner: StepObserver) -> None:
        self._inner = inner

    def step(self, record: StepRecord, chunks: Sequence[Chunk]) -> None:
        if traced(record.step):
            self._inner.step(record, chunks)

    def verdict(self, record: StepRecord, straggler: Straggler) -> None:
        if traced(record.step):
            self._inner.verdict(record, straggler)


def alternate(engine: Engine) -> None:
    """run_group's setup hook in each rank."""
    assert engine.observer is not None, "tracing is on"
    engine.observer = Alternating(engine.observer)


def block_costs(results: list[RankResult]) -> dict[int, float]:
    """Per block of steps, the median over its steps and every rank of the milliseconds from a step's start to the
    next one's; whole blocks only."""
    costs: dict[int, list[float]] = {}
    for result in results:
        for step, following in zip(result.steps, result.steps[1:], strict=False):
            if following.step == step.step + 1:
                costs.setdefault(step.step // BLOCK, []).append(1000 * (following.started - step.started))
    whole = len(results) * (BLOCK - 1)
    return {block: statistics.median(ms) for block, ms in costs.items() if len(ms) >= whole}


def comparisons(blocks: dict[int, float]) -> list[float]:
    """Each traced block's cost over the mean of its two untraced neighbours', minus one (block 0 left out)."""
    return [
        blocks[b] / ((blocks[b - 1] + blocks[b + 1]) / 2) - 1
        for b in blocks
        if traced(b * BLOCK) and b - 1 > 0 and b - 1 in blocks and b + 1 in blocks
    ]


def tracer_us_per_step(every: int, steps: int = 20_000) -> float:
    """Microseconds rank 0's StepTracer takes per step (its step and verdict calls), spans exported in batches."""
    provider = TracerProvider(id_generator=AgreedIds())
    provider.add_span_processor(BatchSpanProcessor(InMemorySpanExporter()))
    spans = {f"r{i}": SpanContext(i + 1, i + 1, is_remote=False, trace_flags=TraceFlags(1)) for i in range(8)}
    member = GroupMember("run", 0, 2, "w0")
    tracer = StepTracer(provider.get_tracer(__name__), provider.sampler, member, "tiny", every, spans)
    chunks = [Chunk(cast(Request, SimpleNamespace(request_id=i)), 1) for i in spans]
    records = [StepRecord(step, 8, 512, 0, 8, 0.009, {"attention": 0.001}) for step in range(1, steps + 1)]
    verdict = Straggler(1, 1.3, "attention")
    start = time.perf_counter()
    for record in records:
        tracer.step(record, chunks)
        tracer.verdict(record, verdict)
    elapsed = time.perf_counter() - start
    provider.shutdown()
    return 1e6 * elapsed / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--instances", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8, help="requests per instance")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=768, help="steps of a run, about (default: 12 blocks)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--kind", default="local", help="the machine it runs on, recorded in the results")
    parser.add_argument("--out", type=Path, default=RESULTS / "tracing_overhead.json")
    parser.add_argument("--plot", type=Path, help="only plot this results file")
    args = parser.parse_args()
    if args.plot:
        plot(json.loads(args.plot.read_text()), args.plot.with_suffix(".png"))
        return

    params = SamplingParams(temperature=0.0, max_tokens=args.new_tokens, ignore_eos=True)
    generator = torch.Generator().manual_seed(0)
    requests = [
        [
            OfflineRequest(
                f"r{rank}-{i}", torch.randint(0, 256, (args.prompt_tokens,), generator=generator).tolist(), params
            )
            for i in range(args.batch)
        ]
        for rank in range(args.instances)
    ]
    config = EngineConfig(page_size=16, num_pages=4096, max_step_tokens=2048, max_running=args.batch)
    blocks: dict[str, list[dict[int, float]]] = {name: [] for name in ARMS}  # per run
    for _, name in track([(r, n) for r in range(args.rounds) for n in ARMS], description="rounds x arms"):
        results = run_group(
            args.model, config, requests, timing=True, timeout_s=900, step_spans_every=ARMS[name], setup=alternate
        )
        blocks[name].append(block_costs(results))

    per_run = {name: [statistics.median(comparisons(run)) for run in runs] for name, runs in blocks.items()}
    overhead = {name: statistics.median(c for run in runs for c in comparisons(run)) for name, runs in blocks.items()}
    step_ms = {name: statistics.median(ms for run in runs for ms in run.values()) for name, runs in blocks.items()}
    tracer_us = {name: tracer_us_per_step(every) for name, every in ARMS.items()}
    result = {
        "benchmark": "decode step cost with step tracing on vs off, alternating in blocks of steps in the same run",
        "model": args.model,
        "device": "cpu",
        "machine": {
            "kind": args.kind,
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "threads_per_rank": 1,
        },
        "torch": torch.__version__,
        "instances": args.instances,
        "batch_per_instance": args.batch,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "block_steps": BLOCK,
        "rounds": args.rounds,
        "timing": "a step's cost: from its start to the next step's start (StepRecord.started); a block's cost: the "
        "median over its steps and every rank; a traced block against the mean of its two untraced neighbours",
        "median_step_ms": step_ms,
        "overhead": overhead,
        "overhead_per_run": per_run,
        "block_ms_per_run": {
            name: [{str(b): ms for b, ms in run.items()} for run in runs] for name, runs in blocks.items()
        },
        "tracer_us_per_step": tracer_us,
        "tracer_share_of_step": {name: us / 1000 / step_ms[name] for name, us in tracer_us.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    table = Table("arm", "median step ms", "overhead", "per run", "tracer µs/step", "share", title=result["benchmark"])
    for name in ARMS:
        table.add_row(
            name,
            f"{step_ms[name]:.3f}",
            f"{100 * overhead[name]:+.2f}%",
            " ".join(f"{100 * x:+.1f}%" for x in per_run[name]),
            f"{tracer_us[name]:.2f}",
            f"{100 * result['tracer_share_of_step'][name]:.3f}%",
        )
    Console(width=150).print(table)
    print(f"wrote {args.out}")
    try:
        plot(result, args.out.with_suffix(".png"))
    except ImportError:
        print("no matplotlib here: plot later with --plot")


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["median_step_ms"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, color in zip(names, ("tab:blue", "tab:orange"), strict=False):
        for run, blocks in enumerate(result["block_ms_per_run"][name]):
            xs = sorted(int(b) for b in blocks)
            left.plot(xs, [blocks[str(b)] for b in xs], color=color, alpha=0.4, label=name if run == 0 else None)
            on = [b for b in xs if traced(b * BLOCK)]
            left.plot(on, [blocks[str(b)] for b in on], "o", color=color, alpha=0.6)
    left.set_xlabel(f"block of {BLOCK} steps (dots: traced)")
    left.set_ylabel("median step cost, ms")
    left.set_title("step cost by block, each run")
    left.legend(fontsize=8)
    for name in names:
        runs = result["overhead_per_run"][name]
        right.plot(range(1, len(runs) + 1), [100 * v for v in runs], marker="o", label=name)
    right.axhline(0, color="grey", linewidth=0.8)
    right.axhspan(-2, 2, color="green", alpha=0.1, label="within 2%")
    right.set_xlabel("run")
    right.set_ylabel("traced block over its neighbours (%, median)")
    machine = result["machine"]
    right.set_title("overhead per run")
    fig.suptitle(f"{result['instances']} CPU instances (gloo), {machine['kind']}, {machine['cores']} cores", fontsize=9)
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
