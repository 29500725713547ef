"""Decode step time of the engine on one GPU with the Qwen3-30B-A3B shapes (random bf16 weights), with its CUDA
graphs and eagerly, over batch size and context length, and the bytes a step must read over that time as a fraction
of the GPU's copy bandwidth.

The engine's own steps are timed (Engine.step: planning on the host, the model, sampling): the wall time of a run
of steps up to its last tokens read, per step. With the overlap scheduler the host plans each step while the device
runs the one before, so a step costs the longer of the two, not their sum. For each context length one batch of
the largest size is prefilled once, then decode steps are timed at each batch size, largest first, aborting requests
to shrink the batch: replaying the engine's graphs with the overlap scheduler, then without it, then with the graphs
set aside (every step eager). Bytes a
step must read: the weights of every expert the step's tokens touch in each layer (counted in one extra eager step),
attention, router and norm weights, the LM head, and the KV the step's rows attend (StepRecord.kv_tokens_read). The
model's max_context is raised to hold 64K contexts (decode time does not depend on the rotary scaling). Writes
bench/results/gpu_decode_step.json (or --out) and, where matplotlib is, a plot.

    python3 bench/gpu_decode_step.py --kind nvidia-h200 [--out DIR] [--steps 20]
    python3 bench/gpu_decode_step.py --plot bench/results/gpu_decode_step.json   # the plot alone
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from gpu_timing import copy_bandwidth
from prefill_rate_gpu import seconds_to_prefill

from nanocp.model_config import ModelConfig, load_model_config
from nanocp.sim.hardware import DEVICES
from nanocp.worker.engine import Engine, EngineConfig
from nanocp.worker.model import SparseMoE
from nanocp.worker.request import SamplingParams
from nanocp.worker.weights import build_model

RESULTS = Path(__file__).parent / "results"
# Batch sizes at each context length, within what the KV pool of an H200 holds next to the weights (~55 GB).
GRID = {1024: [256, 64, 8, 1], 8192: [64, 8, 1], 65536: [8, 1]}
PAGE = 16
MAX_TOKENS = 512  # decode room per request: steps while others prefill, then every batch size's steps, 3 modes
WARMUP_STEPS = 3
HEADROOM_BYTES = 12 << 30  # activations of 16K-token prefill chunks, FlashInfer workspaces, the allocator's slack


def weight_bytes(config: ModelConfig, experts_touched: list[int]) -> dict[str, int]:
    """Weights a step reads: experts_touched[l] distinct experts in layer l; two bytes per bf16 value."""
    h, layers = config.hidden_size, config.num_layers
    attention = h * (config.q_size + 2 * config.kv_size) + config.q_size * h + 2 * config.head_dim + 2 * h
    expert = 3 * config.expert_width * h
    return {
        "experts": 2 * expert * sum(experts_touched),
        "attention_and_norms": 2 * layers * attention,
        "router": 2 * layers * config.num_experts * h,
        "lm_head": 2 * config.vocab_size * h,
    }


def prefill_flops(config: ModelConfig, prompt: int) -> float:
    """Model FLOPs of prefilling one prompt: 2 per weight a token multiplies (attention projections, router, its top-k
    experts; the LM head for the last token only) and the causal attention's QK and PV products (half the square)."""
    h, layers = config.hidden_size, config.num_layers
    per_token = h * (config.q_size + 2 * config.kv_size) + config.q_size * h + config.num_experts * h
    per_token += config.experts_per_token * 3 * config.expert_width * h
    attention = 2 * 2 * (prompt * prompt / 2) * config.num_heads * config.head_dim
    return layers * (2 * prompt * per_token + attention) + 2 * config.vocab_size * h


def with_prefill_mfu(result: dict[str, Any], config: ModelConfig) -> dict[str, Any]:
    """Each prefill's model FLOP utilisation against the device's dense bf16 peak (nanocp.sim.hardware)."""
    peak = DEVICES["h200" if "H200" in result["device"] else "h100"].flops
    for row in result["prefill"]:
        flops = row["prompts"] * prefill_flops(config, row["context"])
        row["model_flops"] = flops
        row["mfu"] = flops / row["seconds"] / peak
    result["peak_bf16_flops"] = peak
    return result


def count_touched_experts(engine: Engine) -> list[int]:
    """Runs one eager step with hooks that count each layer's distinct experts (they sync: this step is not
    timed)."""
    touched: list[int] = []

    def hook(module: torch.nn.Module, args: tuple[torch.Tensor, ...], _: Any) -> None:
        assert isinstance(module, SparseMoE)
        _, experts = module.route(args[0])
        touched.append(int(experts.unique().numel()))

    handles = [m.register_forward_hook(hook) for m in engine.runner.model.modules() if isinstance(m, SparseMoE)]
    try:
        engine.step()
    finally:
        for handle in handles:
            handle.remove()
    return touched


def time_decode(engine: Engine, steps: int) -> tuple[float, int]:
    """Seconds a decode step takes in a run of `steps` after a warm-up (wall time over the run, up to its last
    tokens read: with the overlap scheduler a step's host work hides behind the one before), and the median KV
    tokens a step read."""
    for _ in range(WARMUP_STEPS):
        engine.step()
    engine.flush()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        engine.step()
    engine.flush()
    seconds = (time.perf_counter() - started) / steps
    records = engine.steps.after(0)[-steps:]
    return seconds, int(statistics.median(r.kv_tokens_read for r in records))


@contextlib.contextmanager
def overlap_off(engine: Engine) -> Iterator[None]:
    """Reads each step's tokens before planning the next (no overlap scheduling)."""
    engine.overlap = False
    try:
        yield
    finally:
        engine.overlap = True


@contextlib.contextmanager
def eager(engine: Engine) -> Iterator[None]:
    """Sets the engine's graphs aside: every step runs eagerly, as a GPU engine without graphs does."""
    runner = engine.runner
    graphs, sizes = runner.graphs, runner.static_sizes
    runner.graphs, runner.static_sizes = None, []
    try:
        yield
    finally:
        runner.graphs, runner.static_sizes = graphs, sizes


def run(kind: str, steps: int, out: Path) -> dict[str, Any]:
    bandwidth = copy_bandwidth()
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s", flush=True)
    config = replace(load_model_config("qwen3-30b-a3b", dtype="bfloat16"), max_context=max(GRID) + 2 * MAX_TOKENS)
    built = time.perf_counter()
    model = build_model(config, "cuda", seed=0)
    torch.cuda.synchronize()
    print(f"built {config.name} in {time.perf_counter() - built:.1f} s", flush=True)
    kv_token_bytes = config.kv_bytes_per_token(2)
    needed_pages = max(b * -(-(ctx + MAX_TOKENS) // PAGE) for ctx, sizes in GRID.items() for b in sizes)
    free, _ = torch.cuda.mem_get_info()
    affordable = (free - HEADROOM_BYTES) // (PAGE * kv_token_bytes)
    engine_config = EngineConfig(
        overlap=True,
        page_size=PAGE,
        num_pages=int(min(needed_pages, affordable)),
        max_step_tokens=16384,
        max_running=max(b for sizes in GRID.values() for b in sizes),
        device="cuda",
        dtype="bfloat16",
    )
    captured = time.perf_counter()
    engine = Engine(config, model, engine_config)
    assert engine.runner.graphs is not None
    print(f"captured {len(engine.runner.graphs.sizes)} graphs in {time.perf_counter() - captured:.1f} s", flush=True)
    print(f"KV pool: {engine_config.num_pages} pages ({engine_config.num_pages * PAGE} tokens)", flush=True)
    generator = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    points: list[dict[str, Any]] = []
    prefills: list[dict[str, Any]] = []  # the engine's chunked prefill of each context's prompts, from an idle engine
    for ctx, sizes in GRID.items():
        sizes = [b for b in sizes if b * -(-(ctx + MAX_TOKENS) // PAGE) <= engine_config.num_pages]
        if not sizes:
            continue
        ids = [f"c{ctx}-{i}" for i in range(sizes[0])]
        for request_id in ids:
            prompt = torch.randint(0, config.vocab_size, (ctx,), generator=generator).tolist()
            engine.add_request(request_id, prompt, params, lambda _: None)
        prefill_s = seconds_to_prefill(engine)
        prefills.append(
            {"context": ctx, "prompts": sizes[0], "seconds": prefill_s, "tokens_per_s": sizes[0] * ctx / prefill_s}
        )
        print(f"ctx {ctx}: prefilled {sizes[0]} requests in {prefill_s:.1f} s", flush=True)
        for batch in sizes:
            for request_id in ids[batch:]:
                engine.abort(request_id)
            ids = ids[:batch]
            replays = engine.runner.graphs.replays
            graph_s, kv_tokens = time_decode(engine, steps)
            assert engine.runner.graphs.replays - replays == WARMUP_STEPS + steps, "every timed step replays a graph"
            with overlap_off(engine):
                serial_s, _ = time_decode(engine, steps)
            with eager(engine):
                eager_s, _ = time_decode(engine, steps)
                touched = count_touched_experts(engine)
            weights = weight_bytes(config, touched)
            total = sum(weights.values()) + kv_tokens * kv_token_bytes
            point = {
                "batch": batch,
                "context": ctx,
                "graph_step_ms": graph_s * 1e3,
                "graph_step_ms_without_overlap": serial_s * 1e3,
                "eager_step_ms": eager_s * 1e3,
                "eager_over_graph": eager_s / graph_s,
                "kv_tokens_read": kv_tokens,
                "experts_touched_per_layer": statistics.mean(touched),
                "bytes": {**weights, "kv": kv_tokens * kv_token_bytes, "total": total},
                "graph_bandwidth_fraction": total / graph_s / bandwidth,
                "eager_bandwidth_fraction": total / eager_s / bandwidth,
            }
            points.append(point)
            print(
                f"batch {batch:4d} ctx {ctx:6d}: {total / 1e9:.1f} GB; graphs {1e3 * graph_s:.2f} ms "
                f"({100 * point['graph_bandwidth_fraction']:.1f}% of copy bandwidth; {1e3 * serial_s:.2f} ms without "
                f"overlap), eager {1e3 * eager_s:.2f} ms "
                f"({100 * point['eager_bandwidth_fraction']:.1f}%)",
                flush=True,
            )
        for request_id in ids:
            engine.abort(request_id)
    result = {
        "device": torch.cuda.get_device_name(),
        "kind": kind,
        "torch": torch.__version__,
        "model": "qwen3-30b-a3b shapes, random bf16 weights, max_context raised to hold 64K",
        "mode": "engine steps replaying the engine's CUDA graphs, then with the graphs set aside (eager)",
        "timing": f"wall time of {steps} Engine.step calls up to their last tokens read, per step, after "
        f"{WARMUP_STEPS} warm-up steps, each mode; graphs with the overlap scheduler and without it",
        "copy_bandwidth_bytes_per_s": bandwidth,
        "page_size": PAGE,
        "num_pages": engine_config.num_pages,
        "points": points,
        "prefill": prefills,
    }
    result = with_prefill_mfu(result, config)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_decode_step.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (time_ax, bw_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for ctx in sorted({p["context"] for p in result["points"]}):
        chosen = sorted((p for p in result["points"] if p["context"] == ctx), key=lambda p: p["batch"])
        batches = [p["batch"] for p in chosen]
        label = f"context {ctx // 1024}K"
        (line,) = time_ax.plot(batches, [p["graph_step_ms"] for p in chosen], marker="o", label=f"{label}, graphs")
        bw_ax.plot(batches, [100 * p["graph_bandwidth_fraction"] for p in chosen], marker="o", label=f"{label}, graphs")
        style = {"marker": "x", "ls": "--", "color": line.get_color()}
        time_ax.plot(batches, [p["eager_step_ms"] for p in chosen], **style, label=f"{label}, eager")
        bw_ax.plot(batches, [100 * p["eager_bandwidth_fraction"] for p in chosen], **style, label=f"{label}, eager")
    for ax in (time_ax, bw_ax):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch (decoding requests)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    time_ax.set_ylabel("ms")
    bw_ax.set_ylabel("bytes read / step time (% of copy bandwidth)")
    fig.suptitle(f"Qwen3-30B-A3B shapes: engine decode step with CUDA graphs and eager, {result['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", default="unknown", help="the device kind it runs on, recorded in the results")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--plot", type=Path, help="only plot this results file")
    parser.add_argument("--derive", type=Path, help="only add the prefill MFU to this results file (no GPU needed)")
    args = parser.parse_args()
    if args.derive:
        config = load_model_config("qwen3-30b-a3b", dtype="bfloat16")
        derived = with_prefill_mfu(json.loads(args.derive.read_text()), config)
        args.derive.write_text(json.dumps(derived, indent=2) + "\n")
        return
    if args.plot:
        plot(json.loads(args.plot.read_text()), args.plot.with_suffix(".png"))
        return
    result = run(args.kind, args.steps, args.out)
    try:
        plot(result, args.out / "gpu_decode_step.png")
    except ImportError:
        print("no matplotlib here: plot later with --plot", flush=True)


if __name__ == "__main__":
    main()
