"""Context parallelism is exact: a request's KV split into shards on several instances gives the same greedy tokens.

Requests of a 4-instance CPU group are placed at CP degrees 1 to 4, with shards on instances other than their home,
prefill chunks cut at shard boundaries, and decodes that move into the next shard; all must equal the single
instance, which equals transformers (tests/test_group_exactness.py).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from nanocp.harness.offline_group import OfflineRequest, run_alone, run_group
from nanocp.placement import Footprint, Shard
from nanocp.worker.engine import Engine, EngineConfig
from nanocp.worker.request import SamplingParams

PAGE = 8
CONFIG = EngineConfig(page_size=PAGE, num_pages=256, max_step_tokens=48, max_running=8)
SHAPES = [(100, 20), (37, 30), (150, 12), (9, 25), (64, 40), (120, 16)]  # (prompt tokens, new tokens)


def split(prompt: int, new: int, holders: list[int]) -> list[Shard]:
    """Contiguous shards of about equal pages on `holders`, in position order."""
    pages = Footprint(prompt, new).pages(PAGE)
    k = len(holders)
    sizes = [pages // k + (1 if i < pages % k else 0) for i in range(k)]
    starts = [sum(sizes[:i]) * PAGE for i in range(k)]
    return [Shard(h, start, size) for h, start, size in zip(holders, starts, sizes, strict=True)]


def make_requests() -> list[tuple[list[int], SamplingParams]]:
    """(prompt, greedy params) per shape (tests/gpu/multi places the same requests on GPU groups)."""
    generator = torch.Generator().manual_seed(11)
    return [
        (torch.randint(0, 256, (n,), generator=generator).tolist(), SamplingParams(temperature=0.0, max_tokens=m))
        for n, m in SHAPES
    ]


@pytest.fixture(scope="module")
def requests() -> list[tuple[list[int], SamplingParams]]:
    return make_requests()


@pytest.fixture(scope="module")
def single_instance(requests: list[tuple[list[int], SamplingParams]]) -> list[list[int]]:
    offline = [OfflineRequest(f"r{i}", prompt, params) for i, (prompt, params) in enumerate(requests)]
    tokens = run_alone(Engine.from_spec("tiny", CONFIG), offline)
    return [tokens[f"r{i}"] for i in range(len(requests))]


# (home, holders) per request: degree = len(holders).
LAYOUTS = {
    "degree-1-remote": [(0, [1]), (1, [2]), (2, [3]), (3, [0]), (0, [2]), (1, [3])],
    "degree-2": [(0, [0, 1]), (1, [2, 3]), (2, [3, 2]), (3, [1, 0]), (0, [1, 2]), (1, [0, 1])],
    "degree-4": [(0, [0, 1, 2, 3]), (1, [3, 2, 1, 0]), (2, [1, 3, 0, 2]), (3, [2, 0, 3, 1])] * 1
    + [(0, [1, 0, 3, 2]), (2, [0, 1, 2, 3])],
    "mixed-degrees": [(0, [0]), (1, [1, 2, 3]), (2, [0, 2]), (3, [3]), (0, [3, 1, 2, 0]), (1, [2])],
}


@pytest.mark.parametrize(
    ("layout", "static"),
    [(layout, False) for layout in LAYOUTS] + [("degree-4", True), ("mixed-degrees", True)],
    ids=[*LAYOUTS, "degree-4-static-layout", "mixed-degrees-static-layout"],
)
def test_cp_placements_give_the_tokens_of_one_instance(
    requests: list[tuple[list[int], SamplingParams]], single_instance: list[list[int]], layout: str, static: bool
) -> None:
    """static: decode steps take the graph buckets' layout (fixed-slot CP routes, overlapped with the local
    attention), run eagerly: what a GPU group's graphs replay."""
    by_rank: list[list[OfflineRequest]] = [[] for _ in range(4)]
    for i, ((prompt, params), (home, holders)) in enumerate(zip(requests, LAYOUTS[layout], strict=True)):
        shards = split(len(prompt), params.max_tokens, holders)
        by_rank[home].append(OfflineRequest(f"r{i}", prompt, params, shards))
    results = run_group("tiny", replace(CONFIG, static_decode=static, graph_max_batch=4), by_rank)
    tokens = {rid: t for r in results for rid, t in r.tokens.items()}
    for i, expected in enumerate(single_instance):
        assert tokens[f"r{i}"] == expected, f"request {i} placed {LAYOUTS[layout][i]}"
    assert all(r.pages_in_use == 0 and r.pages_committed == 0 for r in results), "every holder freed every shard"
