"""`nanocp sim`: simulate a decode group under a router policy (run), find the highest sustainable request rate per
policy (sweep), or refit the step-time coefficients from a checkout's bench/results (calibrate)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from nanocp.router.policies.names import DEFAULT_SHARD_TOKENS, SHARD_TOKENS_HELP
from nanocp.sim.data import MOONCAKE_HEAD
from nanocp.sim.hardware import DEVICES, LINKS
from nanocp.sim.shapes import SHAPES


def add_sim_parser(commands: Any) -> None:
    """Adds `sim` and its subcommands to the `nanocp` command's subparsers."""
    sim = commands.add_parser("sim", help="simulate a decode group under the router's policies", description=__doc__)
    subcommands = sim.add_subparsers(dest="sim_command", required=True)
    run = subcommands.add_parser("run", help="one workload at one rate under one policy")
    _add_cluster_arguments(run)
    run.add_argument("--policy", default="dcp", help="static, balanced, dcp, uniform (D = N) or uniform:D")
    run.add_argument("--rate", type=float, default=None, help="requests a second (default: the workload's own)")
    run.add_argument("--tpot-slo-ms", type=float, default=30.0, help="for the attainment shown (default 30)")
    run.set_defaults(func=_run)
    sweep = subcommands.add_parser("sweep", help="the highest request rate each policy sustains under TPOT SLOs")
    _add_cluster_arguments(sweep)
    sweep.add_argument("--policies", nargs="+", default=["static", "balanced", "dcp", "uniform:4", "uniform"])
    sweep.add_argument("--slo-ms", type=float, nargs="+", default=[20.0, 30.0, 50.0], help="TPOT SLOs")
    sweep.add_argument("--attainment", type=float, default=0.9, help="share of requests within the SLO (0.9)")
    sweep.add_argument("--max-wait-s", type=float, default=2.0, help="admission wait a good request may have (2)")
    sweep.add_argument("--guess", type=float, default=10.0, help="request rate the bisection starts from")
    sweep.add_argument("--duration-s", type=float, default=30.0, help="seconds of arrivals at each rate (default 30)")
    sweep.add_argument(
        "--windows", type=int, default=2, help="runs from different points of the workload pooled at each rate (2)"
    )
    sweep.set_defaults(func=_sweep)
    calibrate = subcommands.add_parser("calibrate", help="refit the coefficients from bench/results/*.json")
    calibrate.add_argument("--results", type=Path, default=None, help="benchmark results (default bench/results)")
    calibrate.add_argument("--out", type=Path, default=None, help="where the fits go (default nanocp/sim/data)")
    calibrate.set_defaults(func=_calibrate)


def _add_cluster_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="qwen3-30b-a3b", choices=sorted(SHAPES), help="(default qwen3-30b-a3b)")
    parser.add_argument("--device", default="h100", choices=sorted(DEVICES), help="(default h100)")
    parser.add_argument("--link", default="nvlink", choices=sorted(LINKS), help="(default nvlink; cpu: fitted)")
    parser.add_argument("--instances", type=int, default=8, help="instances in the decode group (default 8)")
    parser.add_argument("--kv-gb", type=float, default=None, help="KV pool per instance (default: what is left)")
    parser.add_argument(
        "--calibration", type=Path, default=None, help="coefficients (default nanocp/sim/data/sim_calibration_*.json)"
    )
    parser.add_argument("--prefill", default="disaggregated", choices=("disaggregated", "chunked"))
    parser.add_argument(
        "--trace",
        type=Path,
        default=MOONCAKE_HEAD,
        help="a Mooncake-format trace (default: the 300-request head shipped)",
    )
    parser.add_argument("--mix", action="store_true", help="a generated long-tailed mix instead of the trace")
    parser.add_argument(
        "--requests", type=int, default=None, help="how many (run; default: the whole trace, or 10000 generated)"
    )
    parser.add_argument("--seed", type=int, default=0, help="of the generated mix")
    parser.add_argument("--max-tokens", type=int, default=1024, help="max_tokens every request asks (default 1024)")
    parser.add_argument("--reserve-output-tokens", type=int, default=None, help="as the router's flag")
    parser.add_argument("--queue-size", type=int, default=256, help="the router's admission queue (default 256)")
    parser.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, help=SHARD_TOKENS_HELP)
    parser.add_argument("--max-degree", type=int, default=8, help="dcp's degree cap (default 8)")


def _cluster(args: argparse.Namespace) -> Any:
    from nanocp.sim.calibration import Calibration
    from nanocp.sim.cluster import Cluster
    from nanocp.sim.data import calibration_path

    calibration = Calibration.load(args.calibration or calibration_path("cpu" if args.device == "cpu" else "gpu"))
    link = calibration.link or LINKS[args.link]
    kv_bytes = args.kv_gb * 1e9 if args.kv_gb is not None else None
    return Cluster(
        SHAPES[args.model],
        DEVICES[args.device],
        link,
        args.instances,
        calibration.coefficients,
        kv_bytes=kv_bytes,
        prefill=args.prefill,
    )


def _policy(text: str, args: argparse.Namespace) -> Any:
    from nanocp.sim.cluster import PolicySpec

    name, _, degree = text.partition(":")
    cp_degree = int(degree) if degree else (args.instances if name == "uniform" else None)
    return PolicySpec(name, cp_degree, args.shard_tokens, args.max_degree)


def _workload(args: argparse.Namespace) -> list[Any]:
    from nanocp.workload import load_mooncake, long_tailed, repeat

    if args.mix:
        return long_tailed(args.requests or 10_000, args.seed, max_output=args.max_tokens)
    if not args.trace.is_file():
        raise SystemExit(f"error: no trace at {args.trace}; give --trace PATH or --mix")
    trace = load_mooncake(args.trace)
    return repeat(trace, args.requests or len(trace))


def _run(args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    from nanocp.sim.loop import simulate
    from nanocp.workload import at_rate, describe

    cluster, policy = _cluster(args), _policy(args.policy, args)
    requests = _workload(args)
    if args.rate is not None:
        requests = at_rate(requests, args.rate)
    console = Console()
    console.print(
        f"{cluster.instances} x {cluster.device.name}, {cluster.shape.name}, {cluster.link.name}; "
        f"{cluster.pages_per_instance() * cluster.page_size} KV tokens an instance; workload {describe(requests)}"
    )
    start = time.perf_counter()
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task(f"simulating {policy.label}", total=len(requests))
        result = simulate(
            cluster,
            policy,
            requests,
            max_tokens=args.max_tokens,
            reserve_output_tokens=args.reserve_output_tokens,
            queue_size=args.queue_size,
            progress=lambda done, total: bar.update(task, completed=done),
        )
    wall = time.perf_counter() - start
    table = Table("metric", policy.label, title=f"simulated {result.duration_s:.1f} s in {wall:.1f} s")
    for key, value in result.summary().items():
        table.add_row(key, f"{value:.4g}")
    slo = args.tpot_slo_ms / 1e3
    table.add_row(f"attainment (TPOT <= {args.tpot_slo_ms:g} ms, wait <= 2 s)", f"{result.attainment(slo, 2.0):.3f}")
    console.print(table)


def _sweep(args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    from nanocp.sim.sweep import Slo, at_rates, max_rates

    cluster = _cluster(args)
    requests = _workload(args)
    slos = [Slo(ms / 1e3, args.attainment, args.max_wait_s) for ms in args.slo_ms]
    console = Console()
    table = Table(
        "policy", *(f"TPOT {ms:g} ms" for ms in args.slo_ms), title="highest sustainable request rate (req/s)"
    )
    for text in args.policies:
        policy = _policy(text, args)
        with console.status(f"bisecting {policy.label}"):
            run = at_rates(
                cluster,
                policy,
                requests,
                args.duration_s,
                slos[0],
                args.windows,
                max_tokens=args.max_tokens,
                reserve_output_tokens=args.reserve_output_tokens,
                queue_size=args.queue_size,
            )
            rates = max_rates(run, slos, args.guess)
        table.add_row(policy.label, *(f"{rates[s]:.3g}" for s in slos))
    console.print(table)


def _calibrate(args: argparse.Namespace) -> None:
    from nanocp.sim.calibration import main

    paths = (("--results", args.results), ("--out", args.out))
    main([arg for flag, path in paths if path is not None for arg in (flag, str(path))])
