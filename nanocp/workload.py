"""Workloads: requests with arrival times and lengths, from Mooncake-format traces, time- and length-scaled.

A Mooncake trace is JSON lines of {"timestamp": ms from start, "input_length", "output_length", "hash_ids"}.
Scaling keeps a trace's shape (its long tail, its bursts) while fitting a smaller model or a chosen request rate.
`long_tailed` generates a mix of the same kind when no trace fits.
"""

from __future__ import annotations

import gzip
import json
import math
import random
import statistics
from dataclasses import dataclass, replace
from pathlib import Path


@dataclass(frozen=True)
class TraceRequest:
    arrival_s: float
    input_tokens: int
    output_tokens: int


def load_mooncake(path: Path, limit: int | None = None) -> list[TraceRequest]:
    """The trace's requests, from plain or gzip-compressed JSON lines (told apart by gzip's magic bytes)."""
    requests: list[TraceRequest] = []
    with path.open("rb") as raw:
        compressed = raw.read(2) == b"\x1f\x8b"
    with gzip.open(path, "rt") if compressed else path.open() as lines:
        for line in lines:
            if limit is not None and len(requests) >= limit:
                break
            row = json.loads(line)
            requests.append(TraceRequest(row["timestamp"] / 1000, int(row["input_length"]), int(row["output_length"])))
    return requests


def fit_lengths(
    requests: list[TraceRequest], max_input: int, max_output: int, min_input: int = 1
) -> list[TraceRequest]:
    """Divides input lengths so the longest fits `max_input` (the distribution's shape stays); caps outputs."""
    divisor = max(1.0, max(r.input_tokens for r in requests) / max_input)
    return [
        replace(
            r,
            input_tokens=max(min_input, round(r.input_tokens / divisor)),
            output_tokens=max(1, min(max_output, r.output_tokens)),
        )
        for r in requests
    ]


def at_rate(requests: list[TraceRequest], rate: float) -> list[TraceRequest]:
    """Rescales arrival times (from 0) so the mean arrival rate is `rate` requests a second."""
    start = min(r.arrival_s for r in requests)
    span = max(r.arrival_s for r in requests) - start
    factor = (len(requests) - 1) / rate / span if span > 0 else 0.0
    return [replace(r, arrival_s=(r.arrival_s - start) * factor) for r in requests]


def describe(requests: list[TraceRequest]) -> dict[str, float]:
    inputs = sorted(r.input_tokens for r in requests)
    return {
        "requests": len(requests),
        "input_p50": statistics.median(inputs),
        "input_p99": inputs[min(len(inputs) - 1, int(0.99 * len(inputs)))],
        "input_max": inputs[-1],
        "output_mean": statistics.mean(r.output_tokens for r in requests),
        "duration_s": max(r.arrival_s for r in requests),
    }


def long_tailed(
    count: int, seed: int = 0, long_share: float = 0.15, max_input: int = 131072, max_output: int = 1024
) -> list[TraceRequest]:
    """A generated mix at one request a second (Poisson arrivals; rescale with at_rate): chat-sized prompts
    (log-normal, median 2K tokens) and a `long_share` of documents (log-normal, median 32K, capped at max_input),
    outputs log-normal with median 128 tokens capped at max_output."""
    rng = random.Random(seed)
    requests, clock = [], 0.0
    for _ in range(count):
        median, sigma = (32768, 0.8) if rng.random() < long_share else (2048, 1.0)
        prompt = min(max_input, max(16, round(rng.lognormvariate(math.log(median), sigma))))
        output = min(max_output, max(1, round(rng.lognormvariate(math.log(128), 1.0))))
        requests.append(TraceRequest(clock, prompt, output))
        clock += rng.expovariate(1.0)
    return requests


def repeat(requests: list[TraceRequest], count: int) -> list[TraceRequest]:
    """The first `count` requests of the trace played over and over, each copy starting where the last one ended."""
    span = _period(requests)
    return [
        replace(r, arrival_s=r.arrival_s + (i // len(requests)) * span)
        for i, r in ((i, requests[i % len(requests)]) for i in range(count))
    ]


def rotated(requests: list[TraceRequest], first: int) -> list[TraceRequest]:
    """The trace played from its `first` request, the ones before it following its last one period later (as
    `repeat` would play them)."""
    span = _period(requests)
    return requests[first:] + [replace(r, arrival_s=r.arrival_s + span) for r in requests[:first]]


def _period(requests: list[TraceRequest]) -> float:
    """How long one play of the trace lasts: its first to last arrival and one mean gap more."""
    return (requests[-1].arrival_s - requests[0].arrival_s) * len(requests) / max(1, len(requests) - 1)
