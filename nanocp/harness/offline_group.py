"""Runs a decode group offline: N engine processes on this machine, each given its own requests, until all finish.

What tests (exactness across group sizes, stragglers) and benchmarks (the step breakdown, tracing's overhead) use;
the service path is the same engine driven by the worker server instead, watched by the same metrics and spans.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.openmetrics.exposition import generate_latest

from nanocp.harness.delays import DelayedTimer
from nanocp.placement import Shard
from nanocp.telemetry import AgreedIds
from nanocp.worker.engine import Engine, EngineConfig
from nanocp.worker.group import Group
from nanocp.worker.group_spec import GroupSpec
from nanocp.worker.observe import watch_steps
from nanocp.worker.request import RequestOutput, SamplingParams
from nanocp.worker.timing import StepRecord


@dataclass(frozen=True)
class OfflineRequest:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    shards: list[Shard] | None = None  # its KV placement over the group; None: all on its home


@dataclass
class RankResult:
    rank: int
    tokens: dict[str, list[int]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)  # request id -> "CODE: message", for requests that failed
    steps: list[StepRecord] = field(default_factory=list)  # sections are timed when asked for
    pages_in_use: int = 0  # at the end: anything left is a leak
    pages_committed: int = 0
    spans: list[dict[str, Any]] = field(default_factory=list)  # its step spans (ReadableSpan.to_json()), if traced
    metrics: str = ""  # its step metrics in the OpenMetrics exposition (exemplars included), if asked for
    graph_replays: int = 0  # decode steps its CUDA graphs replayed
    eager_steps: dict[str, int] = field(default_factory=dict)  # steps no graph took, by why
    error: str | None = None


def run_alone(engine: Engine, requests: list[OfflineRequest]) -> dict[str, list[int]]:
    """Runs the requests on one engine in this process until all finish; each request's tokens."""
    tokens: dict[str, list[int]] = {}

    def collect(out: RequestOutput) -> None:
        tokens.setdefault(out.request_id, []).extend(out.new_token_ids)

    for r in requests:
        engine.add_request(r.request_id, r.prompt, r.params, collect, r.shards)
    while engine.step():
        pass
    return tokens


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_group(
    model: str,
    config: EngineConfig,
    requests_by_rank: list[list[OfflineRequest]],
    timing: bool = False,
    timeout_s: float = 120.0,
    delays: list[dict[str, float]] | None = None,
    metrics: bool = False,
    step_spans_every: int = 0,
    setup: Callable[[Engine], None] | None = None,
) -> list[RankResult]:
    """One process per rank (len(requests_by_rank) of them); returns each rank's tokens and step times.

    On CUDA each rank takes its own GPU: a config.device of "cuda" runs rank r on cuda:r.

    `delays` (a test hook, with timing): per rank, seconds to sleep in named step sections, to make a straggler.
    `metrics`: each rank keeps the worker's step metrics; `step_spans_every` (with timing): each rank traces every
    so many steps into an in-memory exporter, as a worker with tracing on does. `setup` (a benchmark hook, a
    module-level function so that it pickles): called in each rank with its watched engine before it runs.

    Raises RuntimeError naming the rank when one fails or the group does not finish within timeout_s.
    """
    size = len(requests_by_rank)
    port = free_port()
    rank_args = [
        (
            GroupSpec(rank, size, "127.0.0.1", port),
            model,
            config,
            requests,
            timing,
            (delays or [{}] * size)[rank],
            (metrics, step_spans_every),
            setup,
        )
        for rank, requests in enumerate(requests_by_rank)
    ]
    results: list[RankResult] = spawn_ranks(_rank_main, rank_args, timeout_s)
    return results


Reply = tuple[int, Any, str | None]  # what a rank's process puts on its queue: (rank, result, error)


def spawn_ranks(target: Callable[..., None], rank_args: list[tuple[Any, ...]], timeout_s: float) -> list[Any]:
    """Runs target(*rank_args[rank], replies) in a spawned process per rank, each putting one Reply on `replies`;
    returns the results in rank order. Raises RuntimeError naming the rank when one fails or dies, or when the group
    does not finish within timeout_s."""
    size = len(rank_args)
    ctx = mp.get_context("spawn")
    replies: mp.Queue[Reply] = ctx.Queue()
    processes = [ctx.Process(target=target, args=(*args, replies), daemon=True) for args in rank_args]
    for p in processes:
        p.start()
    collected: dict[int, Any] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(collected) < size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RuntimeError(f"the group of {size} did not finish within {timeout_s:.0f} s")
            try:
                rank, result, error = replies.get(timeout=min(remaining, 1.0))
            except Exception:  # queue.Empty: check that nobody died without a word
                dead = [i for i, p in enumerate(processes) if p.exitcode not in (None, 0) and i not in collected]
                if dead:
                    raise RuntimeError(f"rank {dead[0]} exited with code {processes[dead[0]].exitcode}") from None
                continue
            if error is not None:
                raise RuntimeError(f"rank {rank} failed: {error}")
            collected[rank] = result
    finally:
        for p in processes:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return [collected[r] for r in range(size)]


def _rank_main(
    spec: GroupSpec,
    model: str,
    config: EngineConfig,
    requests: list[OfflineRequest],
    timing: bool,
    delays: dict[str, float],
    watched: tuple[bool, int],
    setup: Callable[[Engine], None] | None,
    replies: mp.Queue[Reply],
) -> None:
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    import torch

    torch.set_num_threads(1)  # ranks share the machine's cores
    if config.device == "cuda":
        config = replace(config, device=f"cuda:{spec.rank}")  # NCCL takes one GPU a rank
    result = RankResult(spec.rank)
    try:
        timer = DelayedTimer(delays, enabled=timing, device=config.device)
        engine = Engine.from_spec(model, config, Group(spec, config.device, timeout_s=60), timer)
        metrics, spans_every = watched
        exporter = InMemorySpanExporter()
        provider = TracerProvider(id_generator=AgreedIds())  # as nanocp.telemetry.configure_tracing builds it
        if spans_every:
            provider.add_span_processor(BatchSpanProcessor(exporter))
        step_metrics = watch_steps(
            engine,
            f"w{spec.rank}",
            metrics=metrics,
            tracer_provider=provider if spans_every else trace.NoOpTracerProvider(),
            spans_every=spans_every,
            request_spans={},
        )
        if setup is not None:
            setup(engine)

        def collect(out: RequestOutput) -> None:
            result.tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            if out.error is not None:
                result.errors[out.request_id] = f"{out.error_code}: {out.error}"

        for r in requests:
            engine.add_request(r.request_id, r.prompt, r.params, collect, r.shards)
        while engine.step():
            pass
        result.steps = engine.steps.after(0)
        provider.force_flush()
        result.spans = [json.loads(span.to_json()) for span in exporter.get_finished_spans()]
        if step_metrics is not None:
            result.metrics = generate_latest(step_metrics.registry).decode()
        load = engine.load()
        result.pages_in_use, result.pages_committed = load.pages_in_use, load.pages_committed
        graphs = engine.runner.graphs
        result.graph_replays = graphs.replays if graphs is not None else 0
        result.eager_steps = dict(engine.runner.eager_steps)
        engine.group.exchange_counts([0])  # a barrier: no rank leaves while a peer may still be in a collective
    except Exception as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    replies.put((spec.rank, result, result.error))
    replies.close()
    replies.join_thread()
    # torch.distributed teardown can hang when a peer is gone (and NCCL's can wait on peers); the results are out and
    # every rank has passed the barrier, so leave at once.
    os._exit(0)
