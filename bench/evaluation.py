"""Cluster-scale evaluation of the placement policies with the simulator: writes docs/evaluation.md, its plots in
docs/evaluation/ and the numbers in bench/results/evaluation.json.

For decode groups of N = 8, 16 and 32 H100s serving Qwen3-30B-A3B, NVLink-class and InfiniBand-class links, and two
KV pools (the 80 GB an H100 leaves, about 680K tokens, where TPOT binds before memory at 20 ms; and 12 GB,
about 120K tokens, where memory binds at every SLO), every policy the router has (static, balanced, uniform D = 4 and
D = N, dcp) gets the highest request rate it sustains under TPOT SLOs of 20, 30 and 50 ms (bisection; 90% of requests
within the SLO after at most 2 s of admission wait), then one load for all (the rate static sustains at 30 ms):
P50 / P99 TPOT and admission wait, straggler ratio, KV occupancy spread and mean CP degree. A last sweep varies the
CP route's latency to find where DCP stops paying. The workload is the Mooncake trace (../shared/traces),
time-scaled; every request asks for max_tokens = 1024. Simulations run in parallel processes (--jobs).

    .venv/bin/python bench/evaluation.py [--jobs 2] [--quick]
    .venv/bin/python bench/evaluation.py --cells 8:infiniband:80,32:nvlink:12 --policies balanced,dcp  # to iterate

A subset (--cells, --policies) writes bench/results/evaluation_subset.json and no report: its rates and fixed-load
figures only (the fixed load is static's 30 ms rate where static is among the policies, else the best one's).
After a change to one policy, `--rerun dcp` simulates that policy alone and takes every other one's results from the
committed bench/results/evaluation.json (the same trace and settings), then writes the whole report:

    .venv/bin/python bench/evaluation.py --rerun dcp
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import replace
from pathlib import Path
from typing import Any

from nanocp.sim.calibration import Calibration
from nanocp.sim.cluster import Cluster, PolicySpec
from nanocp.sim.data import calibration_path
from nanocp.sim.hardware import DEVICES, LINKS
from nanocp.sim.loop import simulate
from nanocp.sim.shapes import SHAPES
from nanocp.sim.sweep import EDGE, Slo, at_rates, max_rates
from nanocp.workload import at_rate, describe, load_mooncake, repeat

ROOT = Path(__file__).resolve().parents[1]
TRACE = ROOT.parent / "shared" / "traces" / "mooncake-synthetic.jsonl"
RESULTS = ROOT / "bench" / "results"
DOCS = ROOT / "docs"
SIZES = (8, 16, 32)
LINK_NAMES = ("nvlink", "infiniband")
REGIMES = {"80 GB pool": None, "12 GB pool": 12e9}  # what an H100 leaves for KV; a pool where KV binds throughout
SLOS_MS = (20.0, 30.0, 50.0)
MAX_TOKENS = 1024
DURATION_S = 30.0  # of arrivals at each rate
FIXED_LOAD_SLO_MS = 30.0
SENSITIVITY_SLO_MS = 20.0  # where dcp's edge is largest
P2P_LATENCIES_US = (1.0, 2.5, 5.0, 10.0, 20.0, 40.0)
REL_TOL = 0.05  # the bisection's resolution
WINDOWS = 2  # runs from different points of the trace pooled to judge a rate: one run's attainment is noisy


def policies(n: int) -> list[PolicySpec]:
    return [
        PolicySpec("static"),
        PolicySpec("balanced"),
        PolicySpec("uniform", 4),
        PolicySpec("uniform", n),
        PolicySpec("dcp"),
    ]


def cluster(n: int, link: str, kv_bytes: float | None, p2p_latency_us: float | None = None) -> Cluster:
    calibration = Calibration.load(calibration_path("gpu"))
    chosen = LINKS[link] if p2p_latency_us is None else replace(LINKS[link], p2p_latency_s=p2p_latency_us * 1e-6)
    return Cluster(SHAPES["qwen3-30b-a3b"], DEVICES["h100"], chosen, n, calibration.coefficients, kv_bytes=kv_bytes)


@functools.cache
def trace(path: str) -> list[Any]:
    return load_mooncake(Path(path))


def chosen_cells(spec: str | None) -> set[tuple[int, str, str]] | None:
    """--cells "N:link:pool,...", pool 80 or 12 (GB); None: every cell."""
    if spec is None:
        return None
    cells = set()
    for cell in spec.split(","):
        n, link, pool = cell.split(":")
        if link not in LINK_NAMES or f"{pool} GB pool" not in REGIMES:
            raise SystemExit(f"a cell is N:link:pool with link in {LINK_NAMES} and pool 80 or 12, not {cell}")
        cells.add((int(n), link, f"{pool} GB pool"))
    return cells


def bisect(job: dict[str, Any]) -> dict[str, Any]:
    """The highest sustainable rate of one policy on one cluster, for each SLO."""
    start = time.perf_counter()
    group = cluster(job["n"], job["link"], job["kv_bytes"], job.get("p2p_latency_us"))
    policy = PolicySpec(**job["policy"])
    slos = [Slo(ms / 1e3) for ms in job["slos_ms"]]
    duration = job.get("duration_s", DURATION_S)
    run = at_rates(group, policy, trace(job["trace"]), duration, slos[0], job["windows"], max_tokens=MAX_TOKENS)
    runs: dict[float, Any] = {}
    rates = max_rates(run, slos, guess=3.0 * job["n"], rel_tol=job.get("rel_tol", REL_TOL), runs=runs)
    return {
        **job,
        "rates": {str(s.tpot_s * 1e3): rates[s] for s in slos},
        "simulations": len(runs),
        "wall_s": time.perf_counter() - start,
    }


def at_load(job: dict[str, Any]) -> dict[str, Any]:
    """One policy at one rate: the latency and balance figures."""
    group = cluster(job["n"], job["link"], job["kv_bytes"])
    requests = at_rate(repeat(trace(job["trace"]), round(job["rate"] * DURATION_S)), job["rate"])
    result = simulate(group, PolicySpec(**job["policy"]), requests, max_tokens=MAX_TOKENS)
    return {**job, "summary": result.steady(EDGE).summary()}


def kept_results(args: argparse.Namespace, rerun: set[str]) -> dict[str, list[dict[str, Any]]]:
    """The committed run's results; refused unless that run had these settings and the `rerun` policies."""
    if args.cells or args.policies or args.quick:
        raise SystemExit("--rerun reruns policies over the whole evaluation: no --cells, --policies or --quick")
    previous = json.loads((RESULTS / "evaluation.json").read_text())
    settings = {"trace": args.trace.name, "max_tokens": MAX_TOKENS, "rel_tol": args.rel_tol, "windows": args.windows}
    used = {**{k: previous["workload"][k] for k in ("trace", "max_tokens")},
            **{k: previous["rates"][0][k] for k in ("rel_tol", "windows")}}  # fmt: skip
    if used != settings:
        raise SystemExit(f"the committed run used {used}, not {settings}: run the whole evaluation")
    unknown = rerun - {r["label"] for r in previous["rates"]}
    if unknown:  # found before an hour of simulation, not after
        raise SystemExit(f"the committed run has no policy {sorted(unknown)}: run the whole evaluation")
    return {key: previous[key] for key in ("rates", "fixed_load", "cp_latency")}


def merged(previous: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The committed run's results in its order, with those of the rerun policies replaced by the new ones."""

    def key(r: dict[str, Any]) -> tuple[Any, ...]:
        return r["n"], r["link"], r["regime"], r["label"], r.get("p2p_latency_us")

    fresh = {key(r): r for r in new}
    missing = fresh.keys() - {key(r) for r in previous}
    if missing:  # a policy or cell the committed run lacks would be dropped from the report
        raise SystemExit(f"the committed run has no results for {sorted(missing)}: run the whole evaluation")
    return [fresh.get(key(r), r) for r in previous]


def _each(pool: ProcessPoolExecutor, work: Any, jobs: list[dict[str, Any]], stage: str) -> list[dict[str, Any]]:
    """The jobs' results in order, a line printed as each one finishes."""
    futures = [pool.submit(work, job) for job in jobs]
    for done, future in enumerate(as_completed(futures), 1):
        r = future.result()
        print(f"{stage} {done}/{len(jobs)}: N={r['n']} {r['link']} {r['regime']} {r['label']}", flush=True)
    return [f.result() for f in futures]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=2, help="simulations in parallel (default 2)")
    parser.add_argument("--quick", action="store_true", help="N = 8 only, 10 s at each rate: to try the pipeline")
    parser.add_argument("--trace", type=Path, default=TRACE, help="Mooncake JSON lines, plain or gzip")
    parser.add_argument("--rel-tol", type=float, default=REL_TOL, help=f"bisection resolution (default {REL_TOL})")
    parser.add_argument("--windows", type=int, default=WINDOWS, help=f"runs pooled to judge a rate (default {WINDOWS})")
    parser.add_argument("--cells", help="only these cells, N:link:pool comma-separated (e.g. 8:infiniband:80)")
    parser.add_argument("--policies", help="only these policy labels, comma-separated (e.g. balanced,dcp)")
    parser.add_argument("--rerun", help="only these policy labels; the others' results from the committed run")
    parser.add_argument("--out", type=Path, default=None, help="the results (default bench/results/evaluation.json)")
    parser.add_argument("--docs", type=Path, default=DOCS, help="where evaluation.md and its plots go")
    args = parser.parse_args()
    if not args.trace.is_file():
        raise SystemExit(f"the evaluation replays a Mooncake trace; it is not at {args.trace}")
    sizes = (8,) if args.quick else SIZES
    cells = chosen_cells(args.cells)
    labels = None if args.policies is None else set(args.policies.split(","))
    subset = cells is not None or labels is not None
    kept = None
    if args.rerun:
        labels = set(args.rerun.split(","))
        kept = kept_results(args, labels)
    start = time.perf_counter()
    configs = [
        {"n": n, "link": link, "regime": regime, "kv_bytes": kv, "trace": str(args.trace)}
        for n in sizes
        for link in LINK_NAMES
        for regime, kv in REGIMES.items()
        if cells is None or (n, link, regime) in cells
    ]
    jobs = [
        {**c, "policy": vars(p), "label": p.label, "slos_ms": SLOS_MS, "rel_tol": args.rel_tol, "windows": args.windows}
        for c in configs
        for p in policies(c["n"])
        if labels is None or p.label in labels
    ]
    if args.quick:
        jobs = [{**j, "duration_s": 10.0} for j in jobs]
    with ProcessPoolExecutor(args.jobs) as pool:
        rates = _each(pool, bisect, sorted(jobs, key=lambda j: -j["n"]), "rates")
        rates = merged(kept["rates"], rates) if kept else rates
        loads = []
        for c in configs:
            mine = [r for r in rates if all(r[k] == c[k] for k in ("n", "link", "regime"))]
            baseline = next((r["rates"][str(FIXED_LOAD_SLO_MS)] for r in mine if r["label"] == "static"), None)
            load = baseline or max(r["rates"][str(FIXED_LOAD_SLO_MS)] for r in mine)
            loads += [{**c, "policy": r["policy"], "label": r["label"], "rate": load} for r in mine]
        loads = [j for j in loads if labels is None or j["label"] in labels]
        fixed = _each(pool, at_load, loads, "fixed load")
        fixed = merged(kept["fixed_load"], fixed) if kept else fixed
        n = max(sizes)
        sensitivity = [
            {
                "n": n,
                "link": "nvlink",
                "regime": regime,
                "kv_bytes": kv,
                "p2p_latency_us": us,
                "trace": str(args.trace),
                "policy": vars(p),
                "label": p.label,
                "slos_ms": (SENSITIVITY_SLO_MS,),
                "rel_tol": 0.02,
                "windows": args.windows,
            }
            for regime, kv in list(REGIMES.items())[:1]
            for us in P2P_LATENCIES_US
            for p in (PolicySpec("balanced"), PolicySpec("dcp"))
            if labels is None or p.label in labels
        ]
        if args.quick:
            sensitivity = [{**j, "duration_s": 10.0} for j in sensitivity]
        latency = [] if subset else _each(pool, bisect, sensitivity, "CP latency")
        latency = merged(kept["cp_latency"], latency) if kept else latency
    result = {
        "workload": {"trace": args.trace.name, **describe(load_mooncake(args.trace)), "max_tokens": MAX_TOKENS},
        "dcp": {"shard_tokens": PolicySpec("dcp").shard_tokens, "max_degree": PolicySpec("dcp").max_degree},
        "pages_per_instance": {
            f"{c['n']} {c['regime']}": cluster(c["n"], c["link"], c["kv_bytes"]).pages_per_instance() for c in configs
        },
        "rates": rates,
        "fixed_load": fixed,
        "cp_latency": latency,
        "wall_s": time.perf_counter() - start,
        "rerun": sorted(labels)
        if kept is not None and labels is not None
        else [],  # these policies simulated again, the others kept
    }
    name = "evaluation_subset.json" if subset else "evaluation_quick.json" if args.quick else "evaluation.json"
    out = args.out or RESULTS / name
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out} in {result['wall_s']:.0f} s")
    if not args.quick and not subset:
        from evaluation_report import write_report

        write_report(result, args.docs)


if __name__ == "__main__":
    main()
