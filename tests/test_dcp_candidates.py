"""dcp against its own baseline, for any loads, request and cost model (hypothesis): `balanced`'s placement is always
among dcp's candidates, dcp splits only when its cost model predicts the group's step gets faster, a split's price
over the request's life, and when a request that fits on no single instance is split rather than left to wait."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from nanocp.placement import Footprint, Placement, Shard
from nanocp.router.cost import CostModel
from nanocp.router.placement import InstanceLoad
from nanocp.router.policies.balanced import BalancedPolicy
from nanocp.router.policies.dcp import DCPPolicy, persistence, route_may_pay, route_pays

PAGE = 16
COSTS = [
    CostModel(),  # the defaults: routes cheap against long requests' KV
    CostModel(kv_token_ms=1e-3, home_token_ms=0.1, routed_row_ms=1.0, fixed_ms=0.0),
    CostModel(kv_token_ms=1e-3, home_token_ms=0.1, routed_row_ms=1e-6, fixed_ms=0.5, cp_step_ms=0.4),
    CostModel(kv_token_ms=1.0, home_token_ms=0.0, routed_row_ms=0.0, fixed_ms=0.0),  # splitting always pays
]


@st.composite
def instances(draw: st.DrawFn) -> list[InstanceLoad]:
    loads = []
    for i in range(draw(st.integers(1, 8))):
        total = draw(st.integers(1, 400))
        loads.append(
            InstanceLoad(
                f"i{i}",
                PAGE,
                total,
                pages_committed=draw(st.integers(0, total)),
                home_batch=draw(st.integers(0, 8)),
                routed_rows=draw(st.integers(0, 3)),
                group=draw(st.sampled_from(["g", "g", "h"])),
                rank=i,
                domain=draw(st.sampled_from(["x", "y"])),
            )
        )
    return loads


cases = given(
    loads=instances(),
    footprint=st.builds(Footprint, st.integers(1, 6000), st.integers(1, 500)),
    cost=st.sampled_from(COSTS),
    shard_tokens=st.sampled_from([64, 256, 1024]),
    max_degree=st.integers(1, 4),
)


@settings(max_examples=300, deadline=None)
@cases
def test_balanceds_placement_is_always_among_dcps_candidates(
    loads: list[InstanceLoad], footprint: Footprint, cost: CostModel, shard_tokens: int, max_degree: int
) -> None:
    whole = BalancedPolicy(cost).place(footprint, loads)
    candidates = DCPPolicy(shard_tokens, max_degree, cost).candidates(footprint, loads)
    if whole is not None:
        assert candidates[0] == whole, "balanced's placement comes first, so ties go to it"
    assert all(c.cp_degree > 1 for c in candidates[whole is not None :]), "every other candidate is a split"


@settings(max_examples=300, deadline=None)
@cases
def test_dcp_splits_only_when_the_group_is_predicted_faster(
    loads: list[InstanceLoad], footprint: Footprint, cost: CostModel, shard_tokens: int, max_degree: int
) -> None:
    chosen = DCPPolicy(shard_tokens, max_degree, cost).place(footprint, loads)
    whole = BalancedPolicy(cost).place(footprint, loads)
    if whole is None:
        return  # nothing fits on one instance: a split (or waiting) is all there is
    assert chosen is not None
    group = [i for i in loads if i.group == next(i for i in loads if i.id == chosen.home).group]
    whole_group = [i for i in loads if i.group == next(i for i in loads if i.id == whole.home).group]
    predicted, baseline = cost.scorer(group)(chosen), cost.scorer(whole_group)(whole)
    if chosen.cp_degree == 1:
        assert chosen == whole, "unsplit, dcp places exactly where balanced does"
    else:
        assert predicted < baseline, "a split is chosen only when predicted faster than balanced's placement"
        assert chosen.cp_degree <= min(max_degree, footprint.tokens // shard_tokens), "shards of the target on average"


@settings(max_examples=300, deadline=None)
@cases
def test_a_split_is_priced_at_least_at_its_predicted_group_step(
    loads: list[InstanceLoad], footprint: Footprint, cost: CostModel, shard_tokens: int, max_degree: int
) -> None:
    """Its life's price only takes away balance the greedy step credits it with, never adds any."""
    groups = {i.group: [j for j in loads if j.group == i.group] for i in loads}
    home_group = {i.id: groups[i.group] for i in loads}
    for price, _, placement in DCPPolicy(shard_tokens, max_degree, cost).scored(footprint, loads):
        assert price >= cost.scorer(home_group[placement.home])(placement) - 1e-9


@given(
    moved=st.integers(0, 10_000),
    more=st.integers(0, 10_000),
    level=st.floats(0.0, 10_000.0),
    higher=st.floats(0.0, 10_000.0),
)
def test_the_share_of_balance_that_lasts_grows_with_the_pages_moved_and_shrinks_with_the_level(
    moved: int, more: int, level: float, higher: float
) -> None:
    def split(pages: int) -> Placement:
        return Placement("a", [Shard(0, 0, 1, "a"), Shard(1, PAGE, pages, "b")])

    share = persistence(split(moved), level)
    assert 0.0 <= share <= 1.0
    assert persistence(split(moved + more), level) >= share - 1e-12
    assert persistence(split(moved), level + higher) <= share + 1e-12
    assert persistence(split(moved), 0.0) == 1.0, "in an empty group the balance lasts the request's life"


def _load(id: str, rank: int, committed: int, home: int, total: int = 1000) -> InstanceLoad:
    return InstanceLoad(id, PAGE, total, committed, home, group="g", rank=rank)


def test_a_split_greedy_pricing_takes_is_refused_when_its_balance_does_not_outlast_its_route() -> None:
    """A busy group: the balance a 2-way split buys now (0.8 ms) beats its route (0.5 ms) on this step, but later
    requests would restore most of it by going elsewhere, while the route stays for the request's life."""
    cost = CostModel(kv_token_ms=1e-4, home_token_ms=0.0, routed_row_ms=0.0, fixed_ms=0.0, cp_step_ms=0.5)
    loads = [_load(f"i{r}", r, committed=500, home=4, total=2000) for r in range(4)]
    footprint = Footprint(1024 * 16 - 99, 100)  # 1024 pages: 1.6 ms of KV on one instance, 0.8 on each of two
    dcp = DCPPolicy(shard_tokens=256, max_degree=2, cost=cost)
    priced = [(cost.scorer(loads)(p), p.cp_degree, p) for p in dcp.candidates(footprint, loads)]
    greedy = min(priced, key=lambda s: s[:2])
    assert greedy[2].cp_degree == 2, "on the step it lands in, the split is predicted faster"
    assert dcp.place(footprint, loads) == BalancedPolicy(cost).place(footprint, loads)
    idle = [_load(f"i{r}", r, committed=0, home=0, total=2000) for r in range(4)]
    split = dcp.place(footprint, idle)
    assert split is not None and split.cp_degree == 2, "in an idle group the balance lasts: the split pays"


@settings(max_examples=300, deadline=None)
@cases
def test_a_request_that_fits_nowhere_whole_is_split_only_where_route_pays(
    loads: list[InstanceLoad], footprint: Footprint, cost: CostModel, shard_tokens: int, max_degree: int
) -> None:
    if BalancedPolicy(cost).place(footprint, loads) is not None:
        return
    chosen = DCPPolicy(shard_tokens, max_degree, cost).place(footprint, loads)
    if chosen is not None:
        group = [i for i in loads if i.group == next(i for i in loads if i.id == chosen.home).group]
        own, route = cost.parts(group)(chosen)
        assert route_pays(chosen, own, route, group)


@settings(max_examples=300, deadline=None)
@cases
def test_the_bound_that_skips_pricing_fit_splits_never_skips_one_that_route_pays_would_take(
    loads: list[InstanceLoad], footprint: Footprint, cost: CostModel, shard_tokens: int, max_degree: int
) -> None:
    dcp = DCPPolicy(shard_tokens, max_degree, cost)
    if BalancedPolicy(cost).place(footprint, loads) is not None:
        return
    by_group = {i.group: [j for j in loads if j.group == i.group] for i in loads}
    for home in loads:
        group = by_group[home.group]
        if route_may_pay(footprint, group, cost):
            continue
        for split in dcp._splits(footprint, home, group):
            own, route = cost.parts(group)(split)
            assert not route_pays(split, own, route, group), "the bound said no split of this group could pay"


def test_a_request_that_fits_nowhere_whole_waits_when_its_route_costs_more_than_it_admits() -> None:
    """Four instances with 400 free pages of 1000 each; a 700-page request fits only split. Its route's share of the
    step (1 ms of 2.5) is more than its share of the group's pages (700 of 4000): it waits, as under `balanced`;
    with a route of 0.1 ms it is split. A 1200-page request, larger than any instance, is split either way."""
    loads = [_load(f"i{r}", r, committed=600, home=2) for r in range(4)]
    request = Footprint(700 * PAGE - 100, 100)
    giant = Footprint(1200 * PAGE - 100, 100)

    def dcp(cp_step_ms: float) -> DCPPolicy:
        cost = CostModel(kv_token_ms=1e-4, home_token_ms=0.0, routed_row_ms=0.0, fixed_ms=1.0, cp_step_ms=cp_step_ms)
        return DCPPolicy(shard_tokens=256, max_degree=4, cost=cost)

    assert BalancedPolicy(dcp(1.0).cost).place(request, loads) is None
    assert dcp(1.0).place(request, loads) is None
    split = dcp(0.1).place(request, loads)
    assert split is not None and split.cp_degree >= 2
    giant_split = dcp(1.0).place(giant, loads)
    assert giant_split is not None and giant_split.cp_degree >= 3
