"""Timing helpers shared by the GPU benchmarks: medians of triton.testing.do_bench (CUDA events, L2 flushed before
each call), CUDA-graph replay of a call (what the engine's graphs will pay: no host or launch gaps), and the
device-to-device copy bandwidth that bandwidth fractions are taken against."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

TIMING = "median of triton.testing.do_bench (warmup 25 ms, rep 100 ms, L2 flushed before each call)"


def bench_ms(fn: Callable[[], Any]) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def graphed(fn: Callable[[], Any]) -> tuple[Callable[[], None], Any]:
    """fn captured in a CUDA graph, after a warm-up on a side stream as torch asks: (replay, the captured output,
    which each replay rewrites)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph.replay, out


def idle_gaps(spans: list[tuple[float, float, str]]) -> list[dict[str, Any]]:
    """The gaps the device left between kernels, from their (start, end, name) spans in any order: each gap's length
    (in the spans' unit) and the kernels either side of it. Kernels that overlap (PDL starts one while the one before
    it ends) leave no gap between them."""
    spans = sorted(spans)
    gaps, reach, before = [], spans[0][0], spans[0][2]
    for begin, end, name in spans:
        if begin > reach:
            gaps.append({"us": begin - reach, "after": before, "before": name})
        if end > reach:
            reach, before = end, name
    return gaps


def copy_bandwidth() -> float:
    """Bytes per second of a 1 GiB device-to-device copy, counting bytes read plus bytes written."""
    src = torch.randint(0, 255, (1 << 30,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / (bench_ms(lambda: dst.copy_(src)) / 1e3)
