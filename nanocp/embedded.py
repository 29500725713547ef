"""`nanocp run`: a router and workers as local processes on a small model, and a mixed workload through the SDK.

Shows what a user of the service sees: tokens as they stream, where each request was placed, per-instance load,
and latency (TTFT, TPOT, tokens/s); then the stragglers, from the step logs and from the traces the processes sent
to an OTLP receiver it runs (unless OTEL_* variables send them elsewhere). Every process it starts is stopped before
it returns, whatever happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import statistics
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from rich.console import Console
from rich.live import Live
from rich.table import Table

from nanocp.client import AsyncClient
from nanocp.internal.v1 import worker_pb2
from nanocp.local_cluster import local_cluster, step_logs
from nanocp.model_config import load_model_config
from nanocp.step_traces import request_trees, step_traces
from nanocp.steps import WORK
from nanocp.telemetry import tracing_unset
from nanocp.trace_receiver import ReceivedSpan, TraceReceiver

# `nanocp run` traces every so many steps: denser than a server's default, so a short demo traces a few dozen.
TRACED_STEPS_EVERY = 4
LATEST_IDS = 8  # token ids the streaming table shows a request, when its text is noise
LATEST_CHARS = 32  # characters it shows otherwise


@dataclass
class Stream:
    """One request of the demo workload and what the client saw of it."""

    name: str
    prompt: str
    max_tokens: int
    request_id: str = ""
    start: float = 0.0
    first_token: float | None = None
    end: float | None = None
    tokens: int = 0
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    home: str = "-"
    holders: str = "-"  # instances holding its KV shards, in position order
    degree: int = 0
    finish: str = "queued"

    @property
    def ttft_ms(self) -> float:
        return 1000 * ((self.first_token or self.start) - self.start)

    @property
    def tpot_ms(self) -> float:
        if self.end is None or self.first_token is None or self.tokens < 2:
            return 0.0
        return 1000 * (self.end - self.first_token) / (self.tokens - 1)


def workload(num_requests: int, long_every: int, long_tokens: int) -> list[Stream]:
    """Short chat-sized prompts with a long document prompt every `long_every` requests."""
    topics = ["the weather", "a recipe", "prime numbers", "a short poem", "the moon", "gRPC", "routing", "caches"]
    streams = []
    for i in range(num_requests):
        if long_every and i % long_every == long_every - 1:
            document = ("Context parallelism spreads a long request's KV cache over instances. " * 200)[:long_tokens]
            streams.append(Stream(f"long-{i}", f"Summarise: {document}", max_tokens=48))
        else:
            streams.append(
                Stream(f"short-{i}", f"Tell me about {topics[i % len(topics)]}.", max_tokens=24 + 8 * (i % 4))
            )
    return streams


def has_random_weights(model: str) -> bool:
    """Presets are built with seeded random weights (nanocp.worker.weights): what they sample is noise."""
    return load_model_config(model).path is None


def _escaped(text: str) -> str:
    """Control characters as escapes (\\n, \\x07), so the column stays one readable line."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def latest_output(stream: Stream, random_weights: bool) -> str:
    """What a person can read of the stream so far: its last token ids when the text is noise, else its text."""
    if random_weights:
        return " ".join(str(t) for t in stream.token_ids[-LATEST_IDS:])
    return _escaped(stream.text[-LATEST_CHARS:])


def progress_table(streams: list[Stream], random_weights: bool) -> Table:
    latest = "latest token ids" if random_weights else "latest text"
    table = Table("request", "prompt", "home", "CP", "KV on", "tokens", latest, "state", title="streaming")
    for s in streams:
        table.add_row(
            s.name,
            str(len(s.prompt.encode())),
            s.home,
            str(s.degree or "-"),
            s.holders,
            str(s.tokens),
            latest_output(s, random_weights),
            s.finish,
        )
    return table


async def _run_stream(client: AsyncClient, stream: Stream, delay: float, seed: int) -> None:
    await asyncio.sleep(delay)
    stream.start = time.perf_counter()
    stream.finish = "running"
    call = client.generate(stream.prompt, max_tokens=stream.max_tokens, temperature=0.8, seed=seed)
    stream.request_id = call.request_id
    async for chunk in call:
        now = time.perf_counter()
        if chunk.placement is not None:
            stream.home = chunk.placement.home
            stream.degree = len(chunk.placement.shards)
            stream.holders = ",".join(s.instance for s in chunk.placement.shards)
        if chunk.token_ids and stream.first_token is None:
            stream.first_token = now
        stream.tokens += len(chunk.token_ids)
        stream.text += chunk.text
        stream.token_ids += chunk.token_ids
        if chunk.finish_reason is not None:
            stream.finish = chunk.finish_reason
    stream.end = time.perf_counter()


async def _watch_load(client: AsyncClient, peaks: dict[str, tuple[int, float]], done: asyncio.Event) -> None:
    """Records each instance's peak home batch and KV occupancy while the workload runs."""
    while not done.is_set():
        for inst in (await client.list_instances()).instances:
            batch, kv = peaks.get(inst.id, (0, 0.0))
            occupancy = inst.kv_pages_committed / max(inst.kv_pages_total, 1)
            peaks[inst.id] = (max(batch, inst.home_batch), max(kv, occupancy))
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(done.wait(), 0.05)


async def drive(
    address: str, streams: list[Stream], console: Console, interval: float, random_weights: bool
) -> dict[str, tuple[int, float]]:
    peaks: dict[str, tuple[int, float]] = {}
    async with AsyncClient(address) as client:
        done = asyncio.Event()
        watcher = asyncio.create_task(_watch_load(client, peaks, done))
        with Live(progress_table(streams, random_weights), console=console, refresh_per_second=8) as live:
            tasks = [_run_stream(client, s, i * interval, seed=i) for i, s in enumerate(streams)]
            runner = asyncio.gather(*tasks)
            while not runner.done():
                live.update(progress_table(streams, random_weights))
                await asyncio.wait([runner], timeout=0.1)
            live.update(progress_table(streams, random_weights))
            runner.result()
        console.print()
        done.set()
        await watcher
        await _wait_until_freed(client, timeout=10.0)
    return peaks


async def _wait_until_freed(client: AsyncClient, timeout: float) -> None:
    """Remote holders free a finished request's shards one step after its home does, and the router releases its
    counts as the stream closes: both within milliseconds, so wait briefly before calling anything a leak."""
    deadline = time.monotonic() + timeout
    while True:
        instances = (await client.list_instances()).instances
        held = [i.id for i in instances if i.kv_pages_committed or i.kv_pages_in_use]
        if not held:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"KV pages still held {timeout:.0f} s after every request finished, on: {', '.join(held)}"
            )
        await asyncio.sleep(0.05)


def straggler_table(logs: list[list[worker_pb2.StepRecord]], names: list[str]) -> Table:
    """How often each instance paced the group, and why, as the members judged each step."""
    verdicts = [r for r in logs[0] if r.slowest_rank >= 0]  # every member holds the same verdicts
    table = Table("instance", "slowest in steps", "share", "mean ratio to median", "causes", title="stragglers")
    for rank, name in enumerate(names):
        mine = [r for r in verdicts if r.slowest_rank == rank]
        causes = Counter(r.straggler_cause for r in mine).most_common()
        table.add_row(
            name,
            str(len(mine)),
            f"{100 * len(mine) / max(1, len(verdicts)):.0f}%",
            f"{statistics.mean(r.straggler_ratio for r in mine):.2f}" if mine else "-",
            ", ".join(f"{cause} {count}" for cause, count in causes) or "-",
        )
    table.caption = f"{len(verdicts)} group steps judged by their members (own work: attention, MoE, host)"
    return table


def summary(streams: list[Stream], peaks: dict[str, tuple[int, float]], wall: float) -> list[Table]:
    latency = Table(
        "request", "home", "CP", "KV on", "prompt", "tokens", "TTFT ms", "TPOT ms", "tok/s", "finish", title="latency"
    )
    for s in streams:
        seconds = (s.end or s.start) - s.start
        latency.add_row(
            s.name,
            s.home,
            str(s.degree),
            s.holders,
            str(len(s.prompt.encode())),
            str(s.tokens),
            f"{s.ttft_ms:.1f}",
            f"{s.tpot_ms:.1f}",
            f"{s.tokens / seconds:.0f}" if seconds else "-",
            s.finish,
        )
    total = sum(s.tokens for s in streams)
    latency.caption = f"{len(streams)} requests, {total} tokens in {wall:.2f} s: {total / wall:.0f} tokens/s overall"
    balance = Table("instance", "peak home batch", "peak KV occupancy", title="per-instance balance")
    for instance, (batch, kv) in sorted(peaks.items()):
        balance.add_row(instance, str(batch), f"{100 * kv:.1f}%")
    return [latency, balance]


def trace_table(spans: list[ReceivedSpan], streams: list[Stream], shown: int = 6) -> Table:
    """The traced group steps with the largest straggler ratios: who paced each, why, and whom it slowed."""
    traces = step_traces(spans)
    names = {s.request_id: s.name for s in streams}
    table = Table(
        "step",
        "slowest",
        "cause",
        "ratio",
        " / ".join(WORK) + " ms",
        "requests it slowed",
        "trace id",
        title="straggler traces",
    )
    for t in sorted(sorted(traces, key=lambda t: t.ratio)[-shown:], key=lambda t: t.step):
        slowed = [names.get(r, r[:8]) for r in t.slowed]
        table.add_row(
            str(t.step),
            t.slowest,
            t.cause,
            f"{t.ratio:.2f}",
            " / ".join(f"{t.work_ms[name]:.1f}" for name in WORK) if t.work_ms else "-",
            f"{len(slowed)}: {', '.join(slowed[:3])}{', ...' if len(slowed) > 3 else ''}",
            t.trace_id,
        )
    trees, traced = request_trees(spans)
    table.caption = (
        f"{len(traces)} group steps traced (every {TRACED_STEPS_EVERY}th), the {min(shown, len(traces))} with the "
        f"largest ratios shown (the slowest instance's own breakdown); {trees} of {traced} requests traced from the "
        "router to their home worker"
    )
    return table


def serve_until_signalled(router: str, http_port: int | None, console: Console) -> None:
    """Keeps the cluster up for the user's own clients until Ctrl-C (SIGINT) or SIGTERM."""
    stop = threading.Event()
    handled = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in handled}
    http = f", OpenAI-compatible HTTP on http://127.0.0.1:{http_port}/v1" if http_port else ""
    console.print(f"serving: gRPC on {router}{http}; Ctrl-C stops", highlight=False)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run(
    model: str,
    num_workers: int,
    num_requests: int,
    long_every: int,
    long_tokens: int,
    interval: float,
    router_args: list[str],
    http_port: int | None = None,
    serve: bool = False,
) -> None:
    """`router_args` pass through to `nanocp router` (policy and its settings; the HTTP API on `http_port`).
    `serve`: after the workload, keep the cluster serving until SIGINT or SIGTERM."""
    console = Console(width=None if sys.stdout.isatty() else 160)  # logs and pipes get whole tables
    streams = workload(num_requests, long_every, long_tokens)
    # Traces go to a receiver of our own, unless the OTEL_* variables send them elsewhere (or turn them off).
    receiver = TraceReceiver.start() if tracing_unset() else None
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "200"} if receiver else {}
    worker_args = ("--step-spans-every", str(TRACED_STEPS_EVERY))
    random_weights = has_random_weights(model)
    if random_weights:
        console.print(f"the {model} model's weights are random, so its text is noise: the table shows token ids")
    try:
        with local_cluster(model, num_workers, router_args, console, worker_args, env) as cluster:
            start = time.perf_counter()
            peaks = asyncio.run(drive(cluster.router, streams, console, interval, random_weights))
            wall = time.perf_counter() - start
            logs = asyncio.run(step_logs(cluster.workers))
            for table in summary(streams, peaks, wall):
                console.print(table)
            if num_workers > 1:
                console.print(straggler_table(logs, [f"w{i}" for i in range(num_workers)]))
            if serve:
                serve_until_signalled(cluster.router, http_port, console)
        if receiver is not None:  # every process sent its last spans as it stopped
            console.print(trace_table(receiver.spans(), streams))
            console.print(
                f"spans went over OTLP/gRPC to {receiver.endpoint}; docs/observability.md shows how to send them to "
                "Jaeger, Tempo or Phoenix instead"
            )
    finally:
        if receiver is not None:
            receiver.stop()
    console.print("all processes stopped; every instance's KV pool is back to empty")
