"""Workloads: requests with arrival times and lengths, from Mooncake-format traces, time- and length-scaled.

A Mooncake trace is JSON lines of {"timestamp": ms from start, "input_length", "output_length", "hash_ids"}.
Scaling keeps a trace's shape (its long tail, its bursts) while fitting a smaller model or a chosen request rate.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, replace
from pathlib import Path


@dataclass(frozen=True)
class TraceRequest:
    arrival_s: float
    input_tokens: int
    output_tokens: int


def load_mooncake(path: Path, limit: int | None = None) -> list[TraceRequest]:
    requests: list[TraceRequest] = []
    with path.open() as lines:
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
