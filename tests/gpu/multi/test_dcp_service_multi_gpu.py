"""DCP through the service on 2 and 4 GPUs: a router per placement policy in front of a group of N GPU workers (one
GPU each, NCCL between them), streaming the CPU test's mixed requests through the SDK (tests/test_dcp_service.py,
whose requests and helpers this reuses). Greedy tokens are identical whatever the policy places: static and
balanced keep every request whole, dcp splits only the long one, uniform splits all of them.

The workers run the tiny preset in float32 (the reference attention and experts on the GPU, eager steps): equal
tokens across placements is a float32 property; in bf16 a CP split moves logits by rounding and tokens part at
near-ties, which test_group_exactness_multi_gpu.py checks with the graphs on.

Skips unless there are as many GPUs as workers. NANOCP_MULTI_DEVICE=cpu runs the same on CPU workers (gloo), to
check the test itself where no GPUs are.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/: the CPU suite's helpers
from conftest import ProcessGroup, wait_until
from test_dcp_service import NEW, all_freed, generate_all, router_with

from nanocp.harness.offline_group import free_port

DEVICE = os.environ.get("NANOCP_MULTI_DEVICE", "cuda")
POLICIES = ("static", "balanced", "dcp", "uniform")
# Workers wait this long for a peer: the first steps load kernels (Triton compiles the KV store and the merge).
COLLECTIVE_TIMEOUT_S = 120.0


def needs(gpus: int) -> pytest.MarkDecorator:
    return pytest.mark.skipif(DEVICE == "cuda" and torch.cuda.device_count() < gpus, reason=f"needs {gpus} CUDA GPUs")


def worker_args(rank: int) -> list[str]:
    """Each rank on its own GPU (NCCL takes one a rank), float32."""
    return ["--device", f"cuda:{rank}" if DEVICE == "cuda" else "cpu", "--dtype", "float32"]


async def every_policy(group: ProcessGroup) -> dict[str, Any]:
    results = {}
    for policy in POLICIES:
        async with router_with(policy, group) as client:
            results[policy] = await generate_all(client)
            await wait_until(lambda c=client: all_freed(c), f"every shard freed on every instance after {policy}")
    return results


@pytest.mark.parametrize("size", [pytest.param(2, marks=needs(2)), pytest.param(4, marks=needs(4))])
def test_policies_place_differently_and_generate_identical_tokens(size: int) -> None:
    group = ProcessGroup.start([free_port() for _ in range(size)], worker_args, COLLECTIVE_TIMEOUT_S)
    try:
        results = asyncio.run(every_policy(group))
    finally:
        group.kill()
    tokens = {policy: t for policy, (t, _) in results.items()}
    degrees = {policy: d for policy, (_, d) in results.items()}
    assert all(len(t) == NEW for t in tokens["static"].values())
    for policy in POLICIES[1:]:
        assert tokens[policy] == tokens["static"], f"{policy} gives the tokens of static"
    assert degrees["static"] == degrees["balanced"] == {"long": 1, "short0": 1, "short1": 1}
    assert degrees["dcp"] == {"long": 2, "short0": 1, "short1": 1}, "only the long request is split"
    assert degrees["uniform"] == {"long": 2, "short0": 2, "short1": 2}
