"""The growth rule the service, the simulator and the worker share (nanocp.placement, nanocp.router.growth), and the
cost model's fast scorer."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nanocp.placement import Footprint, Placement, Shard, asks_to_grow, covered_tokens, growth_pages
from nanocp.router.cost import CostModel, with_placement
from nanocp.router.growth import grow
from nanocp.router.placement import InstanceLoad
from nanocp.router.policies.dcp import DCPPolicy
from nanocp.router.policies.static import StaticPolicy
from nanocp.worker.request import Request, SamplingParams

PAGE = 16


@settings(max_examples=200, deadline=None)
@given(prompt=st.integers(1, 200), max_tokens=st.integers(1, 300), quota=st.integers(1, 30), output=st.integers(0, 300))
def test_asks_to_grow_agrees_with_the_workers_rule(prompt: int, max_tokens: int, quota: int, output: int) -> None:
    footprint = Footprint(prompt, max_tokens)
    placement = Placement("a", [Shard(0, 0, quota, "a")])
    params = SamplingParams(max_tokens=max_tokens)
    coverage = covered_tokens(placement.shards, PAGE)
    shards = placement.shards
    request = Request(
        "r", list(range(prompt)), params, lambda _: None, frozenset(), shards, coverage, output=[0] * output
    )
    worker = request.should_ask_for_pages(PAGE)
    assert asks_to_grow(placement.shards, footprint, prompt + output, PAGE) == worker


def test_growth_adds_the_reservation_or_what_is_still_missing() -> None:
    placement = Placement("a", [Shard(0, 0, 4, "a")])  # 64 tokens
    assert growth_pages(placement.shards, Footprint(40, 200), PAGE, reserve=32) == 2
    assert growth_pages(placement.shards, Footprint(40, 30), PAGE, reserve=32) == 1  # 69 tokens: 5 missing
    assert growth_pages(placement.shards, Footprint(40, 200), PAGE, reserve=None) == 11  # 239 tokens: 175 missing


def test_grow_asks_the_policy_and_answers_none_without_room() -> None:
    loads = [InstanceLoad("a", PAGE, 8, 4, 1, group="g"), InstanceLoad("b", PAGE, 8, group="g", rank=1)]
    placement = Placement("a", [Shard(0, 0, 4, "a")])
    grown = grow(StaticPolicy(), placement, Footprint(40, 200), 32, loads, PAGE)
    assert grown == Placement("a", [Shard(0, 0, 6, "a")])
    full = [InstanceLoad("a", PAGE, 4, 4, 1, group="g"), InstanceLoad("b", PAGE, 8, group="g", rank=1)]
    assert grow(StaticPolicy(), placement, Footprint(40, 200), 32, full, PAGE) is None
    spread = grow(DCPPolicy(shard_tokens=64), placement, Footprint(40, 200), 32, full, PAGE)
    assert spread == Placement("a", [Shard(0, 0, 4, "a"), Shard(1, 64, 2, "b")])


loads = st.lists(st.tuples(st.integers(0, 50), st.integers(0, 5), st.integers(0, 4)), min_size=2, max_size=6).map(
    lambda xs: [InstanceLoad(f"i{n}", PAGE, 100, c, h, r, group="g", rank=n) for n, (c, h, r) in enumerate(xs)]
)


@settings(max_examples=200, deadline=None)
@given(loads=loads, data=st.data(), cp_step=st.sampled_from([0.0, 2.5]))
def test_the_scorer_predicts_what_adding_the_placement_to_each_load_predicts(
    loads: list[InstanceLoad], data: st.DataObject, cp_step: float
) -> None:
    cost = CostModel(kv_token_ms=1e-3, home_token_ms=0.3, routed_row_ms=0.2, fixed_ms=1.0, cp_step_ms=cp_step)
    holders = data.draw(st.lists(st.sampled_from(loads), min_size=1, max_size=len(loads), unique_by=lambda i: i.id))
    home = data.draw(st.sampled_from(loads))
    placement = Placement(home.id, [Shard(0, 16 * k, 1 + k, h.id) for k, h in enumerate(holders)])
    expected = cost.group_ms([with_placement(placement, i, +1) for i in loads])
    if placement.routed_rows and any(i.routed_rows for i in loads):
        expected += cp_step  # a split pays its route's latency even when others already route
    assert cost.scorer(loads)(placement) == pytest.approx(expected)
