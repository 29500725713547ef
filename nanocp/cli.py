"""The `nanocp` command: run (an embedded local cluster), router, worker, generate, top and sim (the simulator)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import Any

from nanocp import cli_security
from nanocp.model_config import PRESETS
from nanocp.router import DEFAULT_MAX_MIGRATIONS
from nanocp.router.policies.names import DEFAULT_SHARD_TOKENS, POLICY_NAMES, SHARD_TOKENS_HELP
from nanocp.serve import serve_until_signalled
from nanocp.sim.cli import add_sim_parser
from nanocp.telemetry import STEP_SPANS_EVERY
from nanocp.worker.group_spec import GroupSpec


def _worker(args: argparse.Namespace) -> None:
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")  # before torch loads: idle doorbell waits time out by design
    from nanocp.auth import BearerAuth
    from nanocp.telemetry import configure_tracing
    from nanocp.worker.engine import EngineConfig
    from nanocp.worker.group import GroupSpec
    from nanocp.worker.server import serve_worker

    tls, token = cli_security.server_tls(args), cli_security.internal_token(args)

    provider = configure_tracing("nanocp-worker")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    group = GroupSpec(args.rank, args.world_size, args.master_addr, args.master_port)
    config = EngineConfig(
        page_size=args.page_size,
        num_pages=args.num_pages,
        max_step_tokens=args.max_step_tokens,
        max_running=args.max_running,
        device=args.device,
        seed=args.seed,
        dtype=args.dtype,
        cuda_graphs=not args.no_cuda_graphs,
        graph_max_batch=args.graph_max_batch,
        overlap=args.overlap,
    )
    server = serve_until_signalled(
        lambda: serve_worker(
            args.model,
            config,
            args.host,
            args.port,
            args.instance_id,
            group=group,
            collective_timeout_s=args.collective_timeout,
            domain=args.topology_domain,
            metrics_port=args.metrics_port,
            step_spans_every=args.step_spans_every,
            auth=BearerAuth(token),
            tls=tls,
        ),
        args.shutdown_grace,
    )
    if provider is not None:
        provider.shutdown()  # sends the queued spans: os._exit below skips the SDK's own exit hook
    logging.shutdown()
    # A failed group must restart whole: exit non-zero, and at once (tearing down a broken group can hang). A group
    # that failed after a shutdown drained it is only its members leaving.
    os._exit(1 if server.failure is not None and not server.drained else 0)


def _router(args: argparse.Namespace) -> None:
    from nanocp.router.cost import CostModel
    from nanocp.router.policies import make_policy
    from nanocp.router.server import serve_router
    from nanocp.telemetry import configure_tracing

    configure_tracing("nanocp-router")
    workers = [w.strip() for w in args.workers.split(",") if w.strip()]
    discovery = None
    if args.discover == "k8s":
        from nanocp.router.discovery import KubernetesDiscovery

        if not args.selector:
            sys.exit("error: --discover k8s needs --selector (the worker pods' labels, e.g. app=nanocp-worker)")
        try:
            discovery = KubernetesDiscovery(args.namespace, args.selector, args.port_name)
        except ValueError as exc:
            sys.exit(f"error: --selector: {exc}")
    elif not workers:
        sys.exit("error: give --workers host:port,... or --discover k8s")
    cost = CostModel.load(args.cost_model) if args.cost_model else None
    policy = make_policy(
        args.policy, cp_degree=args.cp_degree, shard_tokens=args.shard_tokens, max_degree=args.max_degree, cost=cost
    )
    serve_until_signalled(
        lambda: serve_router(
            args.model,
            workers,
            args.host,
            args.port,
            policy,
            args.queue_size,
            reserve_output_tokens=args.reserve_output_tokens,
            metrics_port=args.metrics_port,
            http_port=args.http_port,
            discovery=discovery,
            max_migrations=args.max_migrations,
            auth=cli_security.public_auth(args),
            tls=cli_security.server_tls(args),
            internal_token=cli_security.internal_token(args),
            worker_tls=cli_security.worker_tls(args),
        ),
        args.shutdown_grace,
    )


def _run(args: argparse.Namespace) -> None:
    from nanocp.embedded import run

    router_args = ["--policy", args.policy, "--shard-tokens", str(args.shard_tokens)]
    http_port = args.http_port or None
    if http_port is not None:
        router_args += ["--http-port", str(http_port)]
    run(
        args.model,
        args.workers,
        args.requests,
        args.long_every,
        args.long_tokens,
        args.interval,
        router_args,
        http_port,
        args.serve,
    )


def _generate(args: argparse.Namespace) -> None:
    from nanocp.client import Client, NanocpError

    prompt: str | list[int] = [int(t) for t in args.token_ids.split(",")] if args.token_ids else args.prompt
    try:
        with Client(
            args.router, token=args.token, tls=args.tls, ca_file=args.ca_file, server_name=args.server_name
        ) as client:
            for chunk in client.generate(
                prompt,
                max_tokens=args.max_tokens,
                temperature=args.temperature,
                top_k=args.top_k,
                top_p=args.top_p,
                seed=args.seed,
                ignore_eos=args.ignore_eos,
                timeout=args.timeout,
            ):
                sys.stdout.write(chunk.text if chunk.text or not args.ids else f"{chunk.token_ids} ")
                sys.stdout.flush()
                if chunk.finish_reason is not None:
                    sys.stdout.write(f"\n[{chunk.finish_reason}: {chunk.usage}]\n")
    except NanocpError as exc:
        sys.exit(f"error: {exc}")


def _top(args: argparse.Namespace) -> None:
    from rich.console import Console

    from nanocp.client import Credentials
    from nanocp.top import run_top

    credentials = Credentials(args.token, args.tls, args.ca_file, args.server_name)
    with contextlib.suppress(KeyboardInterrupt):
        token = cli_security.internal_token(args)
        asyncio.run(run_top(args.router, args.interval, args.once, Console(), args.steps, credentials, token))


def _non_negative(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {number}")
    return number


# What `--model` takes, in every command that has it.
MODEL_HELP = f"a preset ({', '.join(PRESETS)}) or a local Hugging Face Qwen3-MoE directory"
Commands = argparse._SubParsersAction  # argparse's type of add_subparsers()'s result


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nanocp", description=__doc__)
    parser.add_argument("--log-level", default="INFO", help="logging level of the servers (default INFO)")
    commands = parser.add_subparsers(dest="command", required=True)
    for add in (_add_run, _add_worker, _add_router, _add_generate, _add_top, add_sim_parser):
        add(commands)
    return parser


def _add_run(commands: Commands) -> None:
    run = commands.add_parser("run", help="start a router and workers locally and stream a mixed workload")
    run.add_argument("--model", default="tiny", help=MODEL_HELP)
    run.add_argument("--workers", type=int, default=4, help="instances in the decode group (default 4)")
    run.add_argument("--requests", type=int, default=10, help="requests in the workload (default 10)")
    run.add_argument("--long-every", type=int, default=4, help="every Nth request has a long prompt (default 4)")
    run.add_argument("--long-tokens", type=int, default=1500, help="length of the long prompts (default 1500)")
    run.add_argument("--interval", type=float, default=0.05, help="seconds between arrivals (default 0.05)")
    run.add_argument("--policy", default="dcp", choices=POLICY_NAMES, help="placement (default dcp)")
    run.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, help=SHARD_TOKENS_HELP)
    run.add_argument(
        "--http-port", type=int, default=8000, help="the router's OpenAI-compatible HTTP API (default 8000; 0: off)"
    )
    run.add_argument("--serve", action="store_true", help="after the workload, keep the cluster serving until Ctrl-C")
    run.set_defaults(func=_run)


def _add_worker(commands: Commands) -> None:
    worker = commands.add_parser("worker", help="serve one decode instance (internal API)")
    worker.add_argument("--model", default="tiny", help=MODEL_HELP)
    worker.add_argument("--host", default="127.0.0.1")
    worker.add_argument("--port", type=int, default=50061)
    worker.add_argument("--instance-id", default="w0", help="the name the router shows for this instance")
    worker.add_argument("--page-size", type=int, default=16, help="tokens per KV page (default 16)")
    worker.add_argument("--num-pages", type=int, default=1024, help="KV pages in the pool (default 1024)")
    worker.add_argument("--max-step-tokens", type=int, default=512, help="token budget of a step (default 512)")
    worker.add_argument("--max-running", type=int, default=64, help="most requests in a step (default 64)")
    worker.add_argument("--device", default="cpu", help="torch device (default cpu)")
    worker.add_argument("--seed", type=int, default=0, help="seed of preset weights and unseeded samplers")
    worker.add_argument("--dtype", default=None, help="override the model's dtype (float32, bfloat16)")
    worker.add_argument("--threads", type=int, default=0, help="CPU threads for torch (default: torch's choice)")
    worker.add_argument(
        "--no-cuda-graphs", action="store_true", help="run every step eagerly (default: decode steps replay graphs)"
    )
    worker.add_argument(
        "--overlap",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="plan and launch each step while the device runs the one before, reading its tokens after "
        "(default: on for CUDA devices, off on CPU, where nothing runs apart from the host)",
    )
    worker.add_argument(
        "--graph-max-batch", type=int, default=256, help="the largest decode batch captured as a graph (default 256)"
    )
    worker.add_argument(
        "--metrics-port", type=int, default=None, help="serve Prometheus metrics on this port (default: off)"
    )
    worker.add_argument(
        "--step-spans-every",
        type=int,
        default=STEP_SPANS_EVERY,
        help=f"with tracing on, trace every Nth step of the group; 0: no step spans (default {STEP_SPANS_EVERY})",
    )
    worker.add_argument(
        "--topology-domain",
        default=os.environ.get("NANOCP_TOPOLOGY_DOMAIN", ""),
        help="NVLink clique, rack or host of this instance; shards prefer their home's (default "
        "$NANOCP_TOPOLOGY_DOMAIN)",
    )
    env = GroupSpec.from_env()
    worker.add_argument("--rank", type=int, default=env.rank, help="rank in the decode group (default $RANK or 0)")
    worker.add_argument(
        "--world-size", type=int, default=env.size, help="instances in the decode group (default $WORLD_SIZE or 1)"
    )
    worker.add_argument("--master-addr", default=env.master_addr, help="rendezvous host (default $MASTER_ADDR)")
    worker.add_argument("--master-port", type=int, default=env.master_port, help="rendezvous port ($MASTER_PORT)")
    worker.add_argument(
        "--collective-timeout",
        type=float,
        default=60.0,
        help="seconds a step may wait for a peer before the group is declared failed (default 60)",
    )
    cli_security.add_server_tls_flags(worker, mutual=True)
    cli_security.add_internal_token_flag(worker, sends=False)
    cli_security.add_shutdown_flag(worker)
    worker.set_defaults(func=_worker)


def _add_router(commands: Commands) -> None:
    router = commands.add_parser("router", help="serve the public API in front of workers")
    router.add_argument("--model", default="tiny", help=MODEL_HELP + " (only config and tokenizer are read)")
    router.add_argument("--workers", default="", help="static discovery: comma-separated worker addresses, host:port")
    router.add_argument(
        "--discover",
        default="static",
        choices=("static", "k8s"),
        help="static: the --workers list; k8s: watch the Ready worker pods matching --selector (default static)",
    )
    router.add_argument(
        "--namespace",
        default=os.environ.get("POD_NAMESPACE", "default"),
        help="k8s: namespace of the worker pods (default $POD_NAMESPACE or default)",
    )
    router.add_argument("--selector", default="", help="k8s: label selector of the worker pods, key=value,...")
    router.add_argument(
        "--port-name", default="grpc", help="k8s: name of the worker container's gRPC port (default grpc)"
    )
    router.add_argument("--host", default="127.0.0.1")
    router.add_argument("--port", type=int, default=50051)
    router.add_argument(
        "--policy",
        default="dcp",
        choices=POLICY_NAMES,
        help="dcp: CP degree sized to each request's KV; static: every request on one instance (SGLang DP "
        "attention); balanced: on one instance chosen by predicted step time; uniform: every request at "
        "--cp-degree (default dcp)",
    )
    router.add_argument("--cp-degree", type=int, default=None, help="uniform's CP degree (default: the group size)")
    router.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, help=SHARD_TOKENS_HELP)
    router.add_argument("--max-degree", type=int, default=8, help="dcp: the highest CP degree (default 8)")
    router.add_argument(
        "--metrics-port", type=int, default=None, help="serve Prometheus metrics on this port (default: off)"
    )
    router.add_argument(
        "--http-port",
        type=int,
        default=None,
        help="serve the OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, /v1/models, /health, "
        "/metrics) on this port (default: off)",
    )
    router.add_argument(
        "--reserve-output-tokens",
        type=int,
        default=None,
        help="place requests for their prompt and this many new tokens, growing placements as they decode "
        "(default: reserve max_tokens up front)",
    )
    router.add_argument(
        "--cost-model", type=Path, default=None, help="dcp: JSON of step-time coefficients (nanocp.router.cost)"
    )
    router.add_argument("--queue-size", type=int, default=256, help="requests that may wait for KV memory")
    router.add_argument(
        "--max-migrations",
        type=_non_negative,
        default=DEFAULT_MAX_MIGRATIONS,
        help="how often a request whose decode group fails may move to a healthy group and go on there; 0: its "
        f"stream ends UNAVAILABLE (default {DEFAULT_MAX_MIGRATIONS})",
    )
    cli_security.add_router_security_flags(router)
    cli_security.add_shutdown_flag(router)
    router.set_defaults(func=_router)


def _add_generate(commands: Commands) -> None:
    generate = commands.add_parser("generate", help="stream one completion from a router")
    generate.add_argument("prompt", nargs="?", default="", help="prompt text")
    generate.add_argument("--token-ids", default="", help="comma-separated prompt token ids instead of text")
    generate.add_argument("--router", default="127.0.0.1:50051")
    generate.add_argument("--max-tokens", type=int, default=None)
    generate.add_argument("--temperature", type=float, default=None)
    generate.add_argument("--top-k", type=int, default=None)
    generate.add_argument("--top-p", type=float, default=None)
    generate.add_argument("--seed", type=int, default=None)
    generate.add_argument("--ignore-eos", action="store_true")
    generate.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    generate.add_argument("--ids", action="store_true", help="print token ids when there is no text")
    cli_security.add_client_flags(generate)
    generate.set_defaults(func=_generate)


def _add_top(commands: Commands) -> None:
    top = commands.add_parser("top", help="a live view of a cluster: KV occupancy, batch, step time, stragglers")
    top.add_argument("--router", default="127.0.0.1:50051")
    top.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes (default 1)")
    top.add_argument("--steps", type=int, default=200, help="recent steps per instance to summarise (default 200)")
    top.add_argument("--once", action="store_true", help="print one frame and exit")
    cli_security.add_client_flags(top)
    cli_security.add_internal_token_flag(top, sends=True)  # top reads the workers' steps directly
    top.set_defaults(func=_top)


def main(argv: list[str] | None = None) -> None:
    args: Any = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args.func(args)
