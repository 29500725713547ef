"""What the routing layer costs on one GPU when nothing leaves it: a graphed decode step of a group of one (NCCL,
world size 1: the MoE goes through the routing layer's fixed-capacity all-to-alls inside the graph) against the lone
instance's graphed step (the MoE computed in place), at batch 1, 8 and 64 with 1K contexts, on the Qwen3-30B-A3B
shapes (random bf16 weights); and the routing layer's own time per layer (counts, dispatch and combine of one MoE
layer's rows, replayed in a CUDA graph).

Both variants run in this process, one after the other, on the same weights' seed. Writes
bench/results/routing_layer_gpu_<kind>.json.

    python3 bench/routing_layer_gpu.py --kind nvidia-h200 [--steps 10]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
from gpu_decode_step import PAGE, time_decode
from gpu_timing import TIMING, bench_ms, graphed

from nanocp.harness.offline_group import free_port
from nanocp.model_config import load_model_config
from nanocp.worker import routing
from nanocp.worker.engine import Engine, EngineConfig
from nanocp.worker.request import SamplingParams
from nanocp.worker.weights import build_model

RESULTS = Path(__file__).parent / "results"
BATCHES = [64, 8, 1]
CONTEXT = 1024
MAX_TOKENS = 128


def step_times(steps: int) -> dict[int, float]:
    """Median graphed decode step (ms) at each batch, for an engine built now (a group of one if a process group is
    up)."""
    config = load_model_config("qwen3-30b-a3b", dtype="bfloat16")
    model = build_model(config, "cuda", seed=0)
    engine_config = EngineConfig(
        page_size=PAGE,
        num_pages=max(BATCHES) * -(-(CONTEXT + MAX_TOKENS) // PAGE),
        max_step_tokens=16384,
        max_running=max(BATCHES),
        device="cuda",
        dtype="bfloat16",
    )
    engine = Engine(config, model, engine_config)
    graphs = engine.runner.graphs
    assert graphs is not None
    generator = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    ids = [f"r{i}" for i in range(max(BATCHES))]
    for request_id in ids:
        engine.add_request(
            request_id,
            torch.randint(0, config.vocab_size, (CONTEXT,), generator=generator).tolist(),
            params,
            lambda _: None,
        )
    while engine.scheduler.waiting or any(r.prefilling for r in engine.scheduler.running):
        engine.step()
    times: dict[int, float] = {}
    for batch in BATCHES:
        for request_id in ids[batch:]:
            engine.abort(request_id)
        ids = ids[:batch]
        replays = graphs.replays
        seconds, _ = time_decode(engine, steps)
        assert graphs.replays > replays, "the timed steps replay graphs"
        times[batch] = seconds * 1e3
        print(f"  batch {batch:3d}: {times[batch]:.2f} ms", flush=True)
    del engine, model, graphs
    gc.collect()
    torch.cuda.empty_cache()
    return times


def route_ms(batch: int) -> float:
    """One MoE layer's routing (counts exchange, dispatch, combine) of `batch` tokens' top-8 rows, replayed."""
    config = load_model_config("qwen3-30b-a3b", dtype="bfloat16")
    k, experts, hidden = config.experts_per_token, config.num_experts, config.hidden_size
    rows = torch.randn(batch * k, hidden, device="cuda", dtype=torch.bfloat16)
    chosen = torch.sort(torch.randint(0, experts, (batch * k,), device="cuda")).values
    capacity = batch * k

    def layer() -> torch.Tensor:
        bounds = torch.arange(experts + 1, device="cuda")
        counts = routing.exchange(torch.diff(torch.searchsorted(chosen, bounds)).view(1, -1))
        route = routing.FixedRoute.by_destination(torch.zeros_like(chosen), 1, capacity)
        return route.backward(route.forward(rows)) + counts.sum()

    replay, _ = graphed(layer)
    return bench_ms(replay)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", default="unknown", help="the device kind it runs on, recorded in the results")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    started = time.perf_counter()
    print("lone instance (MoE in place):", flush=True)
    lone = step_times(args.steps)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    print("group of one (MoE through the routing layer, NCCL):", flush=True)
    group = step_times(args.steps)
    layers = load_model_config("qwen3-30b-a3b").num_layers
    routes = {batch: route_ms(batch) for batch in BATCHES}
    dist.destroy_process_group()
    points = [
        {
            "batch": batch,
            "lone_step_ms": lone[batch],
            "group_of_one_step_ms": group[batch],
            "routing_overhead_per_layer_us": 1e3 * (group[batch] - lone[batch]) / layers,
            "route_per_layer_us": 1e3 * routes[batch],
        }
        for batch in BATCHES
    ]
    for p in points:
        print(
            f"batch {p['batch']:3d}: lone {p['lone_step_ms']:.2f} ms, group of one {p['group_of_one_step_ms']:.2f} ms "
            f"({p['routing_overhead_per_layer_us']:+.1f} us a layer); the route alone {p['route_per_layer_us']:.1f} us",
            flush=True,
        )
    result = {
        "device": torch.cuda.get_device_name(),
        "kind": args.kind,
        "torch": torch.__version__,
        "model": f"qwen3-30b-a3b shapes ({layers} layers), random bf16 weights, contexts of {CONTEXT}",
        "timing": f"step: median Engine.step wall time over {args.steps} graphed decode steps; route: {TIMING}, "
        "of a CUDA graph of one layer's counts exchange, dispatch and combine",
        "seconds": time.perf_counter() - started,
        "points": points,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"routing_layer_gpu_{args.kind}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    median = statistics.median(p["routing_overhead_per_layer_us"] for p in points)
    print(f"wrote {path}; median overhead {median:.1f} us a layer", flush=True)


if __name__ == "__main__":
    main()
