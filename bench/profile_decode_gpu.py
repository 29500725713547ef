"""Where a graphed decode step's time goes on one GPU (Qwen3-30B-A3B shapes, random bf16 weights): the engine's step
wall time, the graph replay alone on the device (CUDA events) and launched back to back (what the driver adds between
two launches of one graph), the host's share, and the kernels a replay launches (torch profiler: count per layer, and
the kernels by total time).

The first point is a near-empty step (one request, one page of context): its fixed cost is its step time less the
time its bytes take at copy bandwidth (the weights of one token's experts, attention, router and LM head).

The same script runs before and after a change to the engine; `--label` names the result
(bench/results/profile_decode_gpu_<label>.json), so a before/after table compares two files of one script.

    python3 bench/profile_decode_gpu.py --label after [--out DIR] [--layers 48]
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import json
import pstats
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from gpu_decode_step import weight_bytes
from gpu_timing import copy_bandwidth, idle_gaps

from nanocp.model_config import load_model_config
from nanocp.worker.engine import Engine, EngineConfig
from nanocp.worker.request import SamplingParams
from nanocp.worker.weights import build_model

RESULTS = Path(__file__).parent / "results"
POINTS = [(1, 16), (1, 1024), (64, 1024), (64, 8192)]  # (batch, context)
PAGE = 16
STEPS = 20
WARMUP_STEPS = 5
RUNS = 3  # replays or steps under the torch profiler
MAX_TOKENS = 4 * STEPS + 64  # decode room: the timed and profiled steps, the engine's own steps and warm-ups


def replay_ms(engine: Engine, replays: int) -> float:
    """Median device time of the current bucket's graph replay (the last step's bucket, its plan as it was)."""
    graphs = engine.runner.graphs
    assert graphs is not None
    bucket = graphs.buckets[(graphs.sizes[_bucket_index(engine)], False)]
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        bucket.graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def back_to_back_ms(engine: Engine, replays: int) -> float:
    """Wall time a replay of the current bucket's graph, launched `replays` times with no host work between: above
    the device time, the gap the driver leaves between two launches of one graph."""
    graphs = engine.runner.graphs
    assert graphs is not None
    bucket = graphs.buckets[(graphs.sizes[_bucket_index(engine)], False)]
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(replays):
        bucket.graph.replay()
    torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - started) / replays


def _bucket_index(engine: Engine) -> int:
    graphs = engine.runner.graphs
    assert graphs is not None
    batch = len(engine.scheduler.running)
    return next(i for i, size in enumerate(graphs.sizes) if size >= batch)


def kernels_of_replay(engine: Engine, layers: int) -> dict[str, Any]:
    """Kernels one graph replay launches (profiled over three), by name, with their device time."""
    graphs = engine.runner.graphs
    assert graphs is not None
    bucket = graphs.buckets[(graphs.sizes[_bucket_index(engine)], False)]
    bucket.graph.replay()
    torch.cuda.synchronize()
    count, micros, _ = _device_work(lambda: [bucket.graph.replay() for _ in range(RUNS)], None)
    total = sum(count.values())
    top = [{"kernel": name, "per_step": count[name], "us_per_step": micros[name]} for name, _ in micros.most_common(25)]
    return {"kernels_per_step": total, "kernels_per_layer": total / layers, "top": top}


def outside_the_replay(engine: Engine, replay_top: list[dict[str, Any]], trace: Path | None) -> dict[str, Any]:
    """What three engine steps run on the device beyond their graph replays (the LM head, sampling, the copies of
    inputs and tables), and how long the device idles between its work: the engine step less the replay, taken
    apart. The first step starts from a drained pipeline (no step in flight to hide its host work behind), so the
    idle time holds that step's planning once, spread over the three; the chrome trace (`trace`, where to write
    it) shows the steady steps' gaps apart. Primed with a step in flight instead, the profile would count part of
    that step's replay as work beyond the replays."""

    def steps() -> None:
        for _ in range(RUNS):
            engine.step()
        engine.flush()

    count, micros, idle_us = _device_work(steps, trace)
    in_replay = {row["kernel"]: row["per_step"] for row in replay_top}
    extra = [
        {"kernel": name, "per_step": count[name] - in_replay.get(name, 0), "us_per_step": micros[name]}
        for name, _ in micros.most_common()
        if round(count[name] - in_replay.get(name, 0), 3) > 0  # counts are sums of 1 / RUNS
    ]
    return {"device_idle_us_per_step": idle_us, "beyond_the_replay": extra[:25]}


def _device_work(
    runs: Callable[[], object], trace: Path | None
) -> tuple[collections.Counter[str], collections.Counter[str], float]:
    """Kernels and copies of `runs` (RUNS runs of some work, profiled) by name, per run: their count, their device
    time (us), and the us per run the device idled between the first and the last."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        runs()
        torch.cuda.synchronize()
    if trace is not None:
        prof.export_chrome_trace(str(trace))
    count: collections.Counter[str] = collections.Counter()
    micros: collections.Counter[str] = collections.Counter()
    spans = []
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            name = event.name[:90]
            count[name] += 1 / RUNS
            micros[name] += event.device_time_total / RUNS
            spans.append((event.time_range.start, event.time_range.end, name))
    return count, micros, sum(gap["us"] for gap in idle_gaps(spans)) / RUNS


def top_functions(profile: cProfile.Profile, steps: int) -> list[dict[str, Any]]:
    """The engine step's functions by cumulative host time per step (cProfile), the ten longest."""
    stats = pstats.Stats(profile)
    rows = [
        {"function": f"{path.split('/')[-1]}:{line}({name})", "ms_per_step": 1e3 * cumulative / steps}
        for (path, line, name), (_, _, _, cumulative, _) in stats.stats.items()  # type: ignore[attr-defined]
    ]
    return sorted(rows, key=lambda r: -r["ms_per_step"])[:25]


def run(label: str, layers: int, out: Path, trace: bool, at: list[tuple[int, int]]) -> dict[str, Any]:
    """Profiles each (batch, context) point of `at`; writes and returns the result."""
    out.mkdir(parents=True, exist_ok=True)
    bandwidth = copy_bandwidth()
    base = load_model_config("qwen3-30b-a3b", dtype="bfloat16")
    config = replace(base, num_layers=layers, max_context=16384)
    model = build_model(config, "cuda", seed=0)
    pages = max(b * -(-(ctx + MAX_TOKENS) // PAGE) for b, ctx in at)  # every request's whole footprint
    engine = Engine(
        config,
        model,
        EngineConfig(
            page_size=PAGE,
            num_pages=pages,
            max_step_tokens=16384,
            max_running=64,
            device="cuda",
            dtype="bfloat16",
        ),
    )
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    generator = torch.Generator().manual_seed(0)
    points: list[dict[str, Any]] = []
    result: dict[str, Any] = {}
    for n, (batch, ctx) in enumerate(at):
        ids = [f"p{n}-{i}" for i in range(batch)]
        for request_id in ids:
            prompt = torch.randint(0, config.vocab_size, (ctx,), generator=generator).tolist()
            engine.add_request(request_id, prompt, params, lambda _: None)
        while engine.scheduler.waiting or any(r.prefilling for r in engine.scheduler.running):
            engine.step()
        engine.flush()  # no token in flight: the steps planned below feed real tokens
        walls, hosts = [], []
        for _ in range(STEPS):
            torch.cuda.synchronize()
            started = time.perf_counter()
            # Planned and replayed without the step's bookkeeping: the same decode rows again, idempotent.
            planned = engine.plan_step(engine.scheduler.schedule())
            assert planned is not None
            inputs, _ = planned
            assert engine.runner.graphs is not None
            bucket = engine.runner.graphs.prepare(inputs)
            hosts.append(time.perf_counter() - started)
            engine.runner.graphs.run(bucket)
            torch.cuda.synchronize()
            walls.append(time.perf_counter() - started)
        for _ in range(WARMUP_STEPS):  # what a point's first steps do once (the sampler's first call) stays out
            engine.step()
        engine.flush()
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(STEPS):
            engine.step()
        engine.flush()
        engine_step_s = (time.perf_counter() - started) / STEPS  # overlapped: host work hides behind the device's
        host_profile = cProfile.Profile()  # on steps of their own: the profiler slows the host it measures
        host_profile.enable()
        for _ in range(STEPS):
            engine.step()
        engine.flush()
        host_profile.disable()
        records = engine.steps.after(0)[-STEPS:]
        point = {
            "batch": batch,
            "context": ctx,
            "engine_step_ms": 1e3 * engine_step_s,
            "plan_and_prepare_ms": 1e3 * statistics.median(hosts),
            "planned_replay_wall_ms": 1e3 * statistics.median(walls),
            "replay_device_ms": replay_ms(engine, STEPS),
            "back_to_back_replay_ms": back_to_back_ms(engine, STEPS),
            "kv_tokens_read": records[-1].kv_tokens_read,
            **(replay := kernels_of_replay(engine, layers)),
            **outside_the_replay(engine, replay["top"], out / f"trace_{label}_b{batch}_c{ctx}.json" if trace else None),
            "host_functions": top_functions(host_profile, STEPS),
        }
        if batch == 1:
            floor_s = sum(weight_bytes(config, [config.experts_per_token] * layers).values()) / bandwidth
            point["bytes_floor_ms"] = 1e3 * floor_s
            point["fixed_cost_ms"] = point["engine_step_ms"] - 1e3 * floor_s
        points.append(point)
        print(
            f"batch {batch} ctx {ctx}: engine step {point['engine_step_ms']:.2f} ms, "
            f"replay {point['replay_device_ms']:.2f} ms on the device "
            f"({point['back_to_back_replay_ms']:.2f} back to back), "
            f"plan+prepare {point['plan_and_prepare_ms']:.2f} ms, "
            f"{point['kernels_per_layer']:.1f} kernels a layer",
            flush=True,
        )
        for row in point["host_functions"][:25]:
            print(f"    host {row['ms_per_step']:7.2f} ms  {row['function']}", flush=True)
        for row in point["top"][:12]:
            print(f"    {row['us_per_step']:9.1f} us  x{row['per_step']:5.0f}  {row['kernel']}", flush=True)
        print(f"    beyond the replay (device idle {point['device_idle_us_per_step']:.0f} us a step):", flush=True)
        for row in point["beyond_the_replay"][:15]:
            print(f"    {row['us_per_step']:9.1f} us  x{row['per_step']:5.1f}  {row['kernel']}", flush=True)
        for request_id in ids:
            engine.abort(request_id)
        result = {
            "label": label,
            "device": torch.cuda.get_device_name(),
            "torch": torch.__version__,
            "model": f"qwen3-30b-a3b shapes, {layers} layers, random bf16 weights",
            "copy_bandwidth_bytes_per_s": bandwidth,
            "points": points,
        }
        # Written after each point: a cut-short run keeps what it measured.
        (out / f"profile_decode_gpu_{label}.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--label", required=True, help="names the result file: before, after, ...")
    parser.add_argument("--layers", type=int, default=48)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--trace", action="store_true", help="also write each point's engine steps as a chrome trace")
    parser.add_argument(
        "--points",
        default=",".join(f"{b}x{c}" for b, c in POINTS),
        help="batch x context points, comma-separated (default: %(default)s)",
    )
    args = parser.parse_args()
    points = [(int(b), int(c)) for b, c in (p.split("x") for p in args.points.split(","))]
    run(args.label, args.layers, args.out, args.trace, points)


if __name__ == "__main__":
    main()
