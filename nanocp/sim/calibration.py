"""Fits the step-time model's coefficients from the project's own benchmark results (bench/results/*.json).

GPU (`fit_gpu`), one benchmark per part of the step:
- attention: cp_attention_split.json (H100, FlashInfer decode in CUDA graphs): time = latency + KV bytes / (copy
  bandwidth x kv_efficiency) over every context and batch; the merge of partial states gives merge_s;
- experts: moe_kernels.json (H100, torch._grouped_mm in graphs): latency and weight_efficiency from the
  memory-bound token counts, flops_efficiency from the largest;
- the whole step: gpu_decode_step.json (Qwen3-30B-A3B shapes; engine decode steps replaying its CUDA graphs, host
  work included, or in older runs the forward alone as a graph). The two latencies above come from kernels timed one
  by one (an H100, the kernels of their day), so the engine's whole steps set their size: one scale for both, and a
  cost per token of the batch (token_s: sampling, inputs, small kernels), by least squares on what the step model
  without them leaves of each measured step. Each point's residual and the whole model's error against the measured
  steps are kept in the fit.

CPU (`fit_cpu`) from sim_cpu_steps.json (the 4-instance CPU group on the tiny model), by least squares (refitted
without outliers: steps another process stalled) in two stages that share the cost of a token: on decode steps, each
instance's own work (its step less its routing) on whether it is active, its KV tokens read, its routed rows (one
row a segment there) and whether it routes CP rows; on steps with prefill chunks, what that leaves of their own work
on their tokens and attention pairs. The group's routing (what
the least-waiting member paid): a fixed part and one when any CP route runs from decode steps, a cost per row from
prefill steps. group_step_breakdown.json splits the MoE route's latency into a fixed and a per-peer part, so the CPU
link is fitted too. Prefill attention grows with query rows x KV tokens, which the step logs do not count; rows x KV
read stands in for it (flops_efficiency carries its cost).

`nanocp sim calibrate` refits both from a checkout's bench/results and writes the copy the simulator ships with,
nanocp/sim/data/sim_calibration_{gpu,cpu}.json (nanocp.sim.data).
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from nanocp.least_squares import lstsq, robust_lstsq
from nanocp.sim.data import DATA
from nanocp.sim.hardware import DEVICES, Link
from nanocp.sim.shapes import SHAPES
from nanocp.sim.steptime import Coefficients, StepModel

RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results"
DECODE_TOKENS = 8  # an instance feeding at most this many tokens a step is taken to be decoding only


@dataclass(frozen=True)
class Calibration:
    device: str  # the DEVICES entry it was fitted for
    coefficients: Coefficients
    link: Link | None = None  # fitted only where the link was measured (CPU)
    fit: dict[str, Any] = field(default_factory=dict)  # sources and how well each part fits

    def save(self, path: Path) -> None:
        link = asdict(self.link) if self.link is not None else None
        data = {"device": self.device, "coefficients": asdict(self.coefficients), "link": link, "fit": self.fit}
        path.write_text(json.dumps(data, indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> Calibration:
        data = json.loads(path.read_text())
        link = Link(**data["link"]) if data.get("link") else None
        return cls(data["device"], Coefficients(**data["coefficients"]), link, data.get("fit", {}))


def _relative_errors(predicted: list[float], measured: list[float]) -> dict[str, float]:
    errors = [abs(p - m) / m for p, m in zip(predicted, measured, strict=True) if m > 0]
    return {"median_abs_rel_error": statistics.median(errors), "max_abs_rel_error": max(errors)}


def fit_gpu(results: Path = RESULTS) -> Calibration:
    split = json.loads((results / "cp_attention_split.json").read_text())
    experts = json.loads((results / "moe_kernels.json").read_text())
    decode = json.loads((results / "gpu_decode_step.json").read_text())
    peak = DEVICES["h100"].flops

    # Attention: latency + KV bytes at a fraction of the copy bandwidth.
    copy = split["copy_bandwidth_bytes_per_s"]
    points = [(r["kv_bytes"], r["unsplit_ms"]["graph"] / 1e3) for r in split["rows"]]
    latency, per_byte = lstsq([[1.0, b] for b, _ in points], [t for _, t in points])
    attention = {"latency_s": latency, "kv_efficiency": 1 / (per_byte * copy)}
    merges = [s["merge_ms"]["graph"] / 1e3 for r in split["rows"] for s in r["splits"].values()]
    attention["fit"] = _relative_errors([latency + b * per_byte for b, _ in points], [t for _, t in points])

    # Experts: latency + weight bytes while memory-bound, FLOPs at the largest token count.
    copy = experts["copy_bandwidth_bytes_per_s"]
    rows = [r for r in experts["rows"] if r["tokens"] <= 256]
    grouped = [r["variants"]["grouped_mm"] for r in rows]
    points = [
        (g["weight_bw_fraction"]["graph"] * copy * g["ms"]["graph"] / 1e3, g["ms"]["graph"] / 1e3) for g in grouped
    ]
    expert_latency, per_byte = lstsq([[1.0, b] for b, _ in points], [t for _, t in points])
    largest = max(experts["rows"], key=lambda r: r["tokens"])
    flops_efficiency = largest["variants"]["grouped_mm"]["tflops"]["graph"] * 1e12 / peak
    coefficients = Coefficients(
        kv_efficiency=attention["kv_efficiency"],
        weight_efficiency=1 / (per_byte * copy),
        flops_efficiency=flops_efficiency,
        attention_latency_s=attention["latency_s"],
        expert_latency_s=expert_latency,
        layer_fixed_s=0.0,
        merge_s=statistics.median(merges),
    )

    # The whole step (the module's docstring says why the latencies are scaled): one instance, its expected
    # experts touched.
    shape = SHAPES["qwen3-30b-a3b"]
    device = "h200" if "H200" in decode["device"] else "h100"

    def predict(c: Coefficients) -> list[float]:
        model = StepModel(shape, DEVICES[device], Link("none", 1.0, 0.0, 0.0), c, 1)
        return [model.step([p["batch"]], [p["kv_tokens_read"]], [0]).step_s for p in decode["points"]]

    measured = [p.get("graph_step_ms", p.get("forward_graph_ms", 0.0)) / 1e3 for p in decode["points"]]
    without = predict(replace(coefficients, attention_latency_s=0.0, expert_latency_s=0.0, token_s=0.0))
    latency = shape.layers * (coefficients.attention_latency_s + coefficients.expert_latency_s)
    rows = [[latency, float(p["batch"])] for p in decode["points"]]
    scale, per_token = lstsq(rows, [m - w for m, w in zip(measured, without, strict=True)])
    coefficients = replace(
        coefficients,
        attention_latency_s=scale * coefficients.attention_latency_s,
        expert_latency_s=scale * coefficients.expert_latency_s,
        token_s=per_token,
    )
    predicted = predict(coefficients)
    residuals = [m - p for m, p in zip(measured, predicted, strict=True)]
    fit = {
        "sources": [
            f"cp_attention_split.json ({split['device']})",
            f"moe_kernels.json ({experts['device']})",
            f"gpu_decode_step.json ({decode['device']}: {decode['mode']})",
        ],
        "attention": attention["fit"],
        "forward_residual_ms": [round(1e3 * r, 3) for r in residuals],
        "forward": _relative_errors(predicted, measured),
    }
    return Calibration("h100", coefficients, None, fit)


def fit_cpu(results: Path = RESULTS) -> Calibration:
    steps = json.loads((results / "sim_cpu_steps.json").read_text())
    breakdown = json.loads((results / "group_step_breakdown.json").read_text())
    return fit_cpu_steps([group for run in steps["runs"] for group in run["steps"]], steps["instances"], breakdown)


def fit_cpu_steps(groups: list[list[list[float]]], n: int, breakdown: dict[str, Any]) -> Calibration:
    """The CPU fit from group steps: per instance [home tokens, KV tokens read, routed rows, step ms, routing ms]."""
    shape, device = SHAPES["tiny"], DEVICES["cpu"]
    layers = shape.layers
    # Decode steps (no instance feeds more tokens than it could decode) route one row per segment; steps with
    # prefill chunks route many rows per segment, and their tokens cost what decode tokens do not.
    decode = [g for g in groups if max(s[0] for s in g) <= DECODE_TOKENS]
    prefill = [g for g in groups if max(s[0] for s in g) > DECODE_TOKENS]

    def own(group: list[list[float]]) -> list[tuple[list[float], float]]:
        # [1, active, home, kv, rows, routes CP rows, attention pairs] and own work (step less routing) in seconds.
        # Pairs (query rows x KV tokens) are not logged: a prefill chunk's rows, or the rows an instance answers,
        # times the KV it reads comes close when one chunk dominates the step, as it does.
        return [
            ([1.0, float(h > 0 or r > 0), h, kv, r, float(r > 0), max(h, r) * kv], (ms - routing) / 1e3)
            for h, kv, r, ms, routing in group
        ]

    decode_own = [sample for g in decode for sample in own(g)]
    prefill_own = [sample for g in prefill for sample in own(g)]
    per_token = 0.0
    for _ in range(5):  # the stages share the cost of a token; a few rounds settle it
        x, y = [[f[0], f[1], f[3], f[4], f[5]] for f, _ in decode_own], [t - per_token * f[2] for f, t in decode_own]
        fixed, active, per_kv, per_row, cp = robust_lstsq(x, y)
        rest = [t - fixed - active * f[1] - per_kv * f[3] - cp * f[5] for f, t in prefill_own]
        per_token, per_pair = robust_lstsq([[f[2], f[6]] for f, _ in prefill_own], rest)

    def routing(g: list[list[float]]) -> tuple[float, float, float]:
        # what the least-waiting member paid, whether any CP route ran, the most rows
        return min(s[4] for s in g) / 1e3, float(any(s[2] for s in g)), max(s[2] for s in g)

    route_fixed, route_cp = robust_lstsq(
        [[1.0, a] for _, a, _ in map(routing, decode)], [t for t, _, _ in map(routing, decode)]
    )
    routed = [routing(g) for g in prefill]
    (route_row,) = robust_lstsq(
        [[rows] for _, _, rows in routed], [t - route_fixed - route_cp * a for t, a, _ in routed]
    )
    coefficients = Coefficients(
        kv_efficiency=layers * shape.kv_bytes_per_token_layer / (device.copy_bytes_per_s * per_kv) if per_kv else 1.0,
        weight_efficiency=1.0,
        flops_efficiency=layers * 4 * shape.q_heads * shape.head_dim / (device.flops * per_pair) if per_pair else 1.0,
        attention_latency_s=active / layers,
        expert_latency_s=0.0,
        layer_fixed_s=0.0,
        step_fixed_s=fixed,
        token_s=per_token,
        row_s=per_row,
        merge_s=cp / layers,
    )
    # MoE routes: two all-to-alls a layer, each a fixed latency plus one per peer. The breakdown's N = 2 and N = 4
    # give their proportion: (m4 - m2) / m4 = 2 per_peer / (fixed + 3 per_peer).
    by_n = {r["instances"]: r["ms_per_step"]["moe_route"] for r in breakdown["rows"] if r["batch_per_instance"] == 1}
    total = route_fixed / (2 * layers)  # at N = 4
    per_peer = min(max(0.0, (by_n[4] - by_n[2]) / by_n[4]) / 2, 1 / 3) * total
    link = Link(
        "gloo",
        bytes_per_s=layers * shape.cp_row_bytes / route_row if route_row else 1e12,
        alltoall_latency_s=total - (n - 1) * per_peer,
        p2p_latency_s=route_cp / (2 * layers),
        per_peer_latency_s=per_peer,
    )
    # How well decode steps fit (their features are exact; prefill steps' segments are not in the logs).
    model = StepModel(shape, device, link, coefficients, n)
    features = [[[int(x) for x in s[:3]] for s in g] for g in decode]
    predicted = [model.step(*(list(column) for column in zip(*g, strict=True))).step_s for g in features]
    measured = [max(s[3] for s in g) / 1e3 for g in decode]
    fit = {
        "sources": ["sim_cpu_steps.json (or a fresh run)", "group_step_breakdown.json"],
        "group_steps": {"decode": len(decode), "prefill": len(prefill)},
        "decode_step": _relative_errors(predicted, measured),
        "mean_decode_step_ms": {
            "measured": 1e3 * statistics.mean(measured),
            "predicted": 1e3 * statistics.mean(predicted),
        },
    }
    return Calibration("cpu", coefficients, link, fit)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="nanocp sim calibrate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=RESULTS, help="the benchmark JSON (default bench/results)")
    parser.add_argument("--out", type=Path, default=DATA, help="where the fits go (default nanocp/sim/data)")
    args = parser.parse_args(argv)
    if not args.results.is_dir():  # an installed nanocp has no bench/results: calibrating is a checkout's job
        raise SystemExit(
            f"error: no benchmark results at {args.results}; give --results DIR (a checkout's bench/results)"
        )
    for kind, fit in (("gpu", fit_gpu), ("cpu", fit_cpu)):
        calibration = fit(args.results)
        path = args.out / f"sim_calibration_{kind}.json"
        calibration.save(path)
        print(f"{path}: {json.dumps(asdict(calibration.coefficients))}")
        print(f"  fit: {json.dumps({k: v for k, v in calibration.fit.items() if k != 'forward_residual_ms'})}")
