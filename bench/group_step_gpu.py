"""A decode group on several GPUs (one process and one GPU a rank, NCCL between them) with the Qwen3-30B-A3B shapes
(random bf16 weights, each rank 1/N of the experts), for N = 2 and 4:

(a) the group's decode step replaying its CUDA graphs and eagerly (the graphs set aside, as bench/gpu_decode_step.py
    does), at a batch of 1, 8 and 64 requests per instance of SHORT_TOKENS context, without CP requests and with one
    LONG_TOKENS request of degree N (homed on rank 0, one shard on each rank; rank 0 runs one short request fewer,
    so every instance's batch is the same). A step's time is Engine.step's wall time (StepRecord.seconds: planning,
    the step exchange, the forward, sampling), the slowest rank's, median over the timed steps;
(b) the exposed CP exchange per layer: every layer's attention of a planned CP step (the graph bucket's static plan:
    query rows and K, V out, local attention, received rows' attention, partials back, merge) captured in a CUDA graph
    three times: with the query route overlapped with the local attention (`PagedAttention.overlap`, the engine's
    default), without the overlap, and with the routing layer's exchanges replaced by the identity (the same kernels,
    nothing moved). Exposed exchange = (time - time without exchanges) / layers;
(c) the MoE route per layer: routing.FixedRoute of the step's size (slots found on the device, the per-expert counts
    exchanged, rows out to the experts' holders and back, the capacity the engine gives that bucket), in isolation,
    captured in a CUDA graph, against the peer-to-peer copy bandwidth between GPU 0 and GPU 1 (NVLink on an HGX),
    measured with a 1 GiB copy: the padded bytes each rank sends (the all-to-all of equal splits moves whole
    per-peer buffers) and the valid rows' bytes, over that bandwidth.

Graph timings (b, c) are CUDA events around INNER back-to-back replays after a host barrier, median of REPS, the
slowest rank's. Writes bench/results/group_step_gpu_<kind>.json and a plot beside it; a run of some --sizes keeps
the other sizes of an earlier run of the same kind and settings there (so groups of 2 and of 4 may run apart).

    python3 bench/group_step_gpu.py --kind nvidia-h200-x4 [--sizes 2 4] [--out DIR]
    python3 bench/group_step_gpu.py --device cpu            # the plumbing on CPU: tiny model, gloo, a temp dir
    python3 bench/group_step_gpu.py --plot bench/results/group_step_gpu_nvidia-h200-x4.json   # the plot alone

Each rank joins the group, builds its engine (capturing its graphs), runs every measurement in lockstep with the
others, passes a barrier and leaves with os._exit; the parent waits for all of them under --deadline-s per group and
kills what is left.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import statistics
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from gpu_decode_step import eager

from nanocp.harness.offline_group import Reply, free_port, spawn_ranks
from nanocp.placement import Footprint, Shard
from nanocp.worker import routing
from nanocp.worker.attention import StaticPlan
from nanocp.worker.engine import Engine, EngineConfig
from nanocp.worker.group import Group
from nanocp.worker.group_spec import GroupSpec
from nanocp.worker.request import SamplingParams

RESULTS = Path(__file__).parent / "results"
REPS = 10  # samples of a graph timing
INNER = 20  # replays a sample: a host barrier's skew between ranks spreads over them
MOE_CALLS = 8  # route calls a captured graph holds (layers' worth of routes back to back)


@dataclass(frozen=True)
class Settings:
    device: str  # "cuda" (rank r on cuda:r) or "cpu"
    model: str
    batches: tuple[int, ...]  # requests per instance, largest first
    short_tokens: int
    long_tokens: int
    steps: int  # timed decode steps a mode
    warmup: int
    page_size: int
    num_pages: int
    max_step_tokens: int
    decode_room: int  # max_tokens of every request: all the decode steps the measurements take
    collective_timeout_s: float


GPU = Settings("cuda", "qwen3-30b-a3b", (64, 8, 1), 1024, 32768, 10, 3, 16, 8192, 8192, 256, 300.0)
CPU = Settings("cpu", "tiny", (4, 1), 48, 256, 3, 1, 16, 256, 512, 64, 60.0)
# What the two step modes are: on CPU no graph is captured, and the "graph" steps run the buckets' layout eagerly.
MODES = {
    "cuda": {"graph": "CUDA graphs", "eager": "eager"},
    "cpu": {"graph": "static layout, eager", "eager": "dynamic layout, eager"},
}


# --- in each rank ---------------------------------------------------------------------------------------------------


def even_shards(prompt: int, new: int, holders: list[int], page_size: int) -> list[Shard]:
    """Contiguous shards of about equal pages on `holders`, in position order (the last one takes new tokens)."""
    pages = Footprint(prompt, new).pages(page_size)
    k = len(holders)
    sizes = [pages // k + (1 if i < pages % k else 0) for i in range(k)]
    return [Shard(h, sum(sizes[:i]) * page_size, size) for i, (h, size) in enumerate(zip(holders, sizes, strict=True))]


def barrier(engine: Engine) -> None:
    """Every rank gets here before any goes on (an all-gather on the control group)."""
    engine.group.exchange_counts([0])


def prefill(engine: Engine) -> None:
    """Steps until no rank has a prompt left to prefill (the ranks agree each step, so all run the same steps)."""
    while True:
        scheduler = engine.scheduler
        local = len(scheduler.waiting) + sum(r.prefilling for r in scheduler.running)
        if sum(row[0] for row in engine.group.exchange_counts([local])) == 0:
            return
        engine.step()


def timed_steps(engine: Engine, s: Settings) -> list[float]:
    """Seconds of each of `s.steps` decode steps after `s.warmup` more (every rank runs the same steps). The group
    reads each step before the next (EngineConfig.overlap off), so a record's seconds are its step alone."""
    for _ in range(s.warmup + s.steps):
        engine.step()
    return [r.seconds for r in engine.steps.after(0)[-s.steps :]]


def _sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def _capture(fn: Callable[[], Any]) -> Callable[[], Any]:
    """fn in a CUDA graph, after one eager run (lazy initialisation must not happen under capture); as the engine
    captures its steps, so collectives inside are captured alike on every rank."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize()
    return graph.replay


def time_group(engine: Engine, fn: Callable[[], Any], cuda: bool) -> float:
    """Seconds a call of fn takes here: on CUDA replays of its graph between CUDA events, INNER of them a sample
    after a barrier, median of REPS samples; on CPU the same with host clocks, no graph. Every rank must call it
    with the same collectives in fn."""
    run = _capture(fn) if cuda else fn
    run()
    samples = []
    for _ in range(REPS):
        _sync(cuda)
        barrier(engine)
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(INNER):
                run()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3 / INNER)
        else:
            begin = time.perf_counter()
            for _ in range(INNER):
                run()
            samples.append((time.perf_counter() - begin) / INNER)
    _sync(cuda)
    barrier(engine)
    return statistics.median(samples)


@contextlib.contextmanager
def no_exchanges() -> Iterator[None]:
    """The routing layer's exchanges become the identity: the same kernels run, nothing moves between ranks."""
    grouped = routing.grouped
    routing.grouped = lambda: False
    try:
        yield
    finally:
        routing.grouped = grouped


def cp_exchange(engine: Engine, cuda: bool) -> dict[str, float] | None:
    """Per-layer seconds of every layer's attention of the next (planned, not run) step with the CP exchange
    overlapped, not overlapped, and without exchanges; None when the step has no CP routes."""
    planned = engine.plan_step(engine.scheduler.schedule())  # every rank plans the step; none runs it
    assert planned is not None, "the group has requests"
    inputs, _ = planned
    runner = engine.runner
    plan = runner.graphs.prepare(inputs).plan if runner.graphs is not None else inputs.plan
    if not isinstance(plan, StaticPlan) or plan.routes is None:
        return None
    c, dtype, device = engine.model_config, runner.cache.k.dtype, runner.cache.k.device
    generator = torch.Generator(device=device).manual_seed(engine.group.rank)
    q = torch.randn(plan.rows, c.num_heads, c.head_dim, generator=generator, device=device).to(dtype)
    k = torch.randn(plan.rows, c.num_kv_heads, c.head_dim, generator=generator, device=device).to(dtype)
    v = torch.randn(plan.rows, c.num_kv_heads, c.head_dim, generator=generator, device=device).to(dtype)
    attention = runner.attention

    def layers() -> None:  # K, V go to the slots of the planned step, which its real run rewrites
        attention.plan = plan
        for layer in range(c.num_layers):
            attention.run(layer, q, k, v)

    seconds = {}
    try:
        for name, overlap in (("overlap", True), ("no_overlap", False)):
            attention.overlap = overlap
            seconds[name] = time_group(engine, layers, cuda) / c.num_layers
        attention.overlap = True
        with no_exchanges():
            seconds["no_exchange"] = time_group(engine, layers, cuda) / c.num_layers
    finally:
        attention.overlap = True
    return seconds


def moe_route(engine: Engine, batch: int, cuda: bool) -> dict[str, float]:
    """Seconds of one layer's MoE route for `batch` tokens here (random experts), and the bytes it moves."""
    c, size = engine.model_config, engine.group.size
    device, dtype = engine.runner.cache.k.device, engine.runner.cache.k.dtype
    per_peer = c.num_experts // size
    capacity = engine.runner.moe_capacity(batch)
    generator = torch.Generator(device=device).manual_seed(100 + engine.group.rank)
    scores = torch.rand(batch, c.num_experts, generator=generator, device=device)
    flat = scores.topk(c.experts_per_token, dim=-1).indices.flatten()
    sorted_experts = flat[torch.argsort(flat, stable=True)]
    rows = torch.randn(len(flat), c.hidden_size, generator=generator, device=device).to(dtype)
    bounds = torch.arange(c.num_experts + 1, device=device)

    def routes() -> None:  # what SparseMoE._routed_experts routes, without the experts
        for _ in range(MOE_CALLS):
            route = routing.FixedRoute.by_destination(sorted_experts // per_peer, size, capacity)
            per_expert = torch.diff(torch.searchsorted(sorted_experts, bounds)).view(size, per_peer)
            routing.exchange(per_expert)
            route.backward(route.forward(rows))

    seconds = time_group(engine, routes, cuda) / MOE_CALLS
    row_bytes = c.hidden_size * rows.element_size()
    remote = int((sorted_experts // per_peer != engine.group.rank).sum())
    return {
        "seconds": seconds,
        "capacity": capacity,
        # Both ways, what leaves this GPU: whole buffers of the other peers' shares, or only the valid rows.
        "padded_bytes": 2 * (size - 1) * capacity * row_bytes,
        "valid_bytes": 2 * remote * row_bytes,
    }


def scenario(engine: Engine, s: Settings, cp: bool) -> list[dict[str, Any]]:
    rank, size = engine.group.rank, engine.group.size
    cuda = s.device == "cuda"
    params = SamplingParams(temperature=0, max_tokens=s.decode_room, ignore_eos=True)
    generator = torch.Generator().manual_seed(2 * rank + cp)

    def prompt(tokens: int) -> list[int]:
        return torch.randint(0, engine.model_config.vocab_size, (tokens,), generator=generator).tolist()

    long_here = cp and rank == 0
    if long_here:
        shards = even_shards(s.long_tokens, s.decode_room, list(range(size)), s.page_size)
        engine.add_request("long", prompt(s.long_tokens), params, lambda _: None, shards)
    ids = [f"short{i}" for i in range(s.batches[0] - long_here)]
    for request_id in ids:
        engine.add_request(request_id, prompt(s.short_tokens), params, lambda _: None)
    prefill(engine)
    points = []
    for batch in s.batches:
        for request_id in ids[batch - long_here :]:
            engine.abort(request_id)
        ids = ids[: batch - long_here]
        graphs = engine.runner.graphs
        replays, eager_before = (graphs.replays if graphs else 0), sum(engine.runner.eager_steps.values())
        point: dict[str, Any] = {"batch": batch, "cp": cp, "graph_step_s": timed_steps(engine, s)}
        point["graph_replays"] = (graphs.replays if graphs else 0) - replays
        point["steps_not_graphed"] = sum(engine.runner.eager_steps.values()) - eager_before
        with eager(engine):
            point["eager_step_s"] = timed_steps(engine, s)
        point["cp_exchange_s"] = cp_exchange(engine, cuda) if cp else None
        point["moe_route"] = moe_route(engine, batch, cuda)
        points.append(point)
        print(f"rank {rank} of {size}: batch {batch}{' with CP' if cp else ''} done", flush=True)
    for request_id in [*ids, *(["long"] if long_here else [])]:
        engine.abort(request_id)
    while engine.step():  # the holders free the long request's shards
        pass
    return points


@torch.inference_mode()
def measure(engine: Engine, s: Settings) -> dict[str, Any]:
    return {"points": scenario(engine, s, cp=False) + scenario(engine, s, cp=True)}


def engine_config(s: Settings, device: str) -> EngineConfig:
    return EngineConfig(
        page_size=s.page_size,
        num_pages=s.num_pages,
        max_step_tokens=s.max_step_tokens,
        max_running=s.batches[0],
        device=device,
        dtype="bfloat16" if s.device == "cuda" else None,
        graph_max_batch=s.batches[0],
        static_decode=True,  # on CPU, where no graph is captured, "graph" steps run the buckets' layout eagerly
        overlap=False,  # each step's record times that step alone: the breakdown's subject
    )


def rank_main(spec: GroupSpec, s: Settings, results: mp.Queue[Reply]) -> None:
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    if s.device == "cpu":
        torch.set_num_threads(1)  # the ranks share the machine's cores
    device = f"cuda:{spec.rank}" if s.device == "cuda" else "cpu"  # each rank its own GPU
    try:
        group = Group(spec, device, timeout_s=s.collective_timeout_s)
        started = time.perf_counter()
        engine = Engine.from_spec(s.model, engine_config(s, device), group)
        print(f"rank {spec.rank}: engine built in {time.perf_counter() - started:.1f} s", flush=True)
        measured = measure(engine, s)
        barrier(engine)  # every rank done with every collective before any leaves
        results.put((spec.rank, measured, None))
    except Exception:
        results.put((spec.rank, None, traceback.format_exc()))
    results.close()
    results.join_thread()
    os._exit(0)  # tearing down NCCL can wait on peers that are gone; the results are out


# --- the parent ------------------------------------------------------------------------------------------------------


def launch(s: Settings, size: int, deadline_s: float) -> list[dict[str, Any]]:
    """One process per rank; each rank's measurements, in rank order."""
    port = free_port()
    measured: list[dict[str, Any]] = spawn_ranks(
        rank_main, [(GroupSpec(rank, size, "127.0.0.1", port), s) for rank in range(size)], deadline_s
    )
    return measured


def p2p_bandwidth(nbytes: int = 1 << 30, reps: int = 20) -> dict[str, Any]:
    """Bytes per second of a large copy from GPU 0 to GPU 1 and back (each byte counted once), host-timed around
    `reps` copies with both devices synchronised."""
    a = torch.empty(nbytes, dtype=torch.uint8, device="cuda:0")
    b = torch.empty(nbytes, dtype=torch.uint8, device="cuda:1")
    result: dict[str, Any] = {"peer_access": torch.cuda.can_device_access_peer(0, 1), "bytes": nbytes}
    for name, dst, src in (("gpu0_to_gpu1", b, a), ("gpu1_to_gpu0", a, b)):
        dst.copy_(src)
        for d in (0, 1):
            torch.cuda.synchronize(d)
        begin = time.perf_counter()
        for _ in range(reps):
            dst.copy_(src)
        for d in (0, 1):
            torch.cuda.synchronize(d)
        result[f"{name}_bytes_per_s"] = reps * nbytes / (time.perf_counter() - begin)
    del a, b
    for d in (0, 1):
        with torch.cuda.device(d):
            torch.cuda.empty_cache()
    return result


def summarise(size: int, ranks: list[dict[str, Any]], link_bytes_per_s: float | None, layers: int) -> dict[str, Any]:
    """The group's figures per point: the slowest rank's (a step lasts as long as its slowest member)."""
    points = []
    for per_rank in zip(*(r["points"] for r in ranks), strict=True):
        first = per_rank[0]
        point: dict[str, Any] = {"batch": first["batch"], "cp": first["cp"]}
        for mode in ("graph", "eager"):
            steps = zip(*(p[f"{mode}_step_s"] for p in per_rank), strict=True)
            point[f"{mode}_step_ms"] = 1e3 * statistics.median(max(step) for step in steps)
        point["graph_replays"] = min(p["graph_replays"] for p in per_rank)
        point["steps_not_graphed"] = max(p["steps_not_graphed"] for p in per_rank)
        exchanges = [p["cp_exchange_s"] for p in per_rank]
        if all(e is not None for e in exchanges):
            point["cp_exchange_us_per_layer"] = {
                "attention_overlap": 1e6 * max(e["overlap"] for e in exchanges),
                "attention_no_overlap": 1e6 * max(e["no_overlap"] for e in exchanges),
                "attention_no_exchange": 1e6 * max(e["no_exchange"] for e in exchanges),
                "exposed_overlap": 1e6 * max(e["overlap"] - e["no_exchange"] for e in exchanges),
                "exposed_no_overlap": 1e6 * max(e["no_overlap"] - e["no_exchange"] for e in exchanges),
            }
        routes = [p["moe_route"] for p in per_rank]
        moe = {
            "us_per_layer": 1e6 * max(r["seconds"] for r in routes),
            "capacity_per_peer": routes[0]["capacity"],
            "padded_bytes_per_rank": max(r["padded_bytes"] for r in routes),
            "valid_bytes_per_rank": max(r["valid_bytes"] for r in routes),
        }
        if link_bytes_per_s:
            # Each rank sends its shares over its own links at once; the pair's copy bandwidth is the floor's rate.
            moe["link_floor_padded_us"] = 1e6 * moe["padded_bytes_per_rank"] / link_bytes_per_s
            moe["link_floor_valid_us"] = 1e6 * moe["valid_bytes_per_rank"] / link_bytes_per_s
        point["moe_route"] = moe
        point["moe_route_ms_per_step"] = moe["us_per_layer"] * layers / 1e3
        points.append(point)
    return {"instances": size, "points": points}


def show(group: dict[str, Any], modes: dict[str, str]) -> None:
    for p in group["points"]:
        line = (
            f"N={group['instances']} batch {p['batch']:3d}{' +CP' if p['cp'] else '    '}: step {modes['graph']} "
            f"{p['graph_step_ms']:7.2f} ms ({p['graph_replays']} replays), "
            f"{modes['eager']} {p['eager_step_ms']:7.2f} ms; "
            f"MoE route {p['moe_route']['us_per_layer']:7.1f} us/layer"
        )
        if "link_floor_padded_us" in p["moe_route"]:
            line += f" (link floor {p['moe_route']['link_floor_padded_us']:.1f} us padded)"
        exchange = p.get("cp_exchange_us_per_layer")
        if exchange is not None:
            line += (
                f"; CP exchange exposed {exchange['exposed_overlap']:.1f} us/layer overlapped, "
                f"{exchange['exposed_no_overlap']:.1f} not"
            )
        print(line, flush=True)


def run(s: Settings, kind: str, sizes: list[int], deadline_s: float, out: Path) -> dict[str, Any]:
    cuda = s.device == "cuda"
    if cuda:
        available = torch.cuda.device_count()
        skipped = [n for n in sizes if n > available]
        if skipped:
            print(f"{available} GPUs here: skipping groups of {skipped}", flush=True)
        sizes = [n for n in sizes if n <= available]
    link = p2p_bandwidth() if cuda and torch.cuda.device_count() >= 2 else None
    if link is not None:
        print(
            f"GPU 0 -> 1 copy {link['gpu0_to_gpu1_bytes_per_s'] / 1e9:.0f} GB/s, 1 -> 0 "
            f"{link['gpu1_to_gpu0_bytes_per_s'] / 1e9:.0f} GB/s (peer access {link['peer_access']})",
            flush=True,
        )
    from nanocp.model_config import load_model_config

    layers = load_model_config(s.model).num_layers
    link_rate = min(link["gpu0_to_gpu1_bytes_per_s"], link["gpu1_to_gpu0_bytes_per_s"]) if link else None
    groups = []
    for size in sizes:
        started = time.perf_counter()
        group = summarise(size, launch(s, size, deadline_s), link_rate, layers)
        print(f"group of {size}: {time.perf_counter() - started:.0f} s", flush=True)
        show(group, MODES[s.device])
        groups.append(group)
    result = {
        "benchmark": "decode step of a group of N GPUs (graphs vs eager), exposed CP exchange and MoE route per layer",
        "kind": kind,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "model": f"{s.model} shapes, random weights" + (", bf16" if cuda else ""),
        "settings": asdict(s),
        "timing": {
            "steps": f"Engine.step wall time (StepRecord.seconds), the slowest rank's, median of {s.steps} steps "
            f"after {s.warmup} warm-up steps",
            "graphs": f"CUDA events around {INNER} replays after a host barrier, median of {REPS}, the slowest rank's",
        },
        "modes": MODES[s.device],
        "link": link,
        "groups": groups,
    }
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"group_step_gpu_{kind}.json"
    if path.exists():  # a run of some sizes keeps the other sizes of an earlier run with the same settings
        earlier = json.loads(path.read_text())
        kept = [g for g in earlier["groups"] if g["instances"] not in sizes]
        if earlier.get("settings") == json.loads(json.dumps(result["settings"])) and kept:
            print(f"keeping the groups of {[g['instances'] for g in kept]} from the earlier {path}", flush=True)
            result["groups"] = sorted(kept + groups, key=lambda g: g["instances"])
            result["link"] = result["link"] or earlier.get("link")
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}", flush=True)
    return result


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (step_ax, cp_ax, moe_ax) = plt.subplots(1, 3, figsize=(16, 4.5))
    for group in result["groups"]:
        n = group["instances"]
        for cp, style in ((False, "-"), (True, "--")):
            chosen = sorted((p for p in group["points"] if p["cp"] == cp), key=lambda p: p["batch"])
            batches = [p["batch"] for p in chosen]
            label = f"N={n}{', one CP request' if cp else ''}"
            (line,) = step_ax.plot(batches, [p["graph_step_ms"] for p in chosen], style, marker="o", label=label)
            step_ax.plot(batches, [p["eager_step_ms"] for p in chosen], style, marker="x", color=line.get_color())
            if cp:
                exchange = [p["cp_exchange_us_per_layer"] for p in chosen]
                (line,) = cp_ax.plot(batches, [e["exposed_overlap"] for e in exchange], marker="o", label=f"N={n}")
                cp_ax.plot(
                    batches,
                    [e["exposed_no_overlap"] for e in exchange],
                    "--",
                    marker="x",
                    color=line.get_color(),
                    label=f"N={n}, no overlap",
                )
            else:
                moe = [p["moe_route"] for p in chosen]
                (line,) = moe_ax.plot(batches, [m["us_per_layer"] for m in moe], marker="o", label=f"N={n}")
                if "link_floor_padded_us" in moe[0]:
                    moe_ax.plot(
                        batches,
                        [m["link_floor_padded_us"] for m in moe],
                        ":",
                        color=line.get_color(),
                        label=f"N={n}, padded bytes at the GPU 0-1 copy rate",
                    )
    modes = result.get("modes", MODES["cuda"])
    step_ax.set_title(f"group decode step (o {modes['graph']}, x {modes['eager']})")
    step_ax.set_ylabel("ms")
    cp_ax.set_title("exposed CP exchange per layer")
    cp_ax.set_ylabel("us")
    moe_ax.set_title("MoE route per layer")
    moe_ax.set_ylabel("us")
    for ax in (step_ax, cp_ax, moe_ax):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch per instance")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(f"{result['model']} on {result['device']} ({result['kind']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--kind", help="the device kind it runs on, in the results' name (default: cpu on CPU)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[2, 4], help="group sizes (default 2 4)")
    parser.add_argument("--batches", type=int, nargs="+", help="requests per instance (default 64 8 1; CPU 4 1)")
    parser.add_argument("--steps", type=int, help="timed decode steps a mode (default 10; CPU 3)")
    parser.add_argument("--deadline-s", type=float, default=900.0, help="the most one group may take (default 900)")
    parser.add_argument("--out", type=Path, help="results directory (default bench/results; CPU: a temp dir)")
    parser.add_argument("--plot", type=Path, help="only plot this results file")
    args = parser.parse_args()
    if args.plot:
        plot(json.loads(args.plot.read_text()), args.plot.with_suffix(".png"))
        return
    s = GPU if args.device == "cuda" else CPU
    if args.batches:
        s = replace(s, batches=tuple(sorted(args.batches, reverse=True)))
    if args.steps:
        s = replace(s, steps=args.steps)
    kind = args.kind or ("cpu" if args.device == "cpu" else "unknown")
    out = args.out or (RESULTS if args.device == "cuda" else Path(tempfile.mkdtemp(prefix="group_step_gpu-")))
    result = run(s, kind, args.sizes, args.deadline_s, out)
    try:
        plot(result, out / f"group_step_gpu_{kind}.png")
    except ImportError:
        print("no matplotlib here: plot later with --plot", flush=True)


if __name__ == "__main__":
    main()
