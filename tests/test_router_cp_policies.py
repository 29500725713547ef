"""The CP policies, table-driven: degree, home, shard holders and quotas, and what the cost model makes them choose."""

from __future__ import annotations

import pytest

from nanocp.placement import Footprint, Placement, Shard
from nanocp.router.cost import CostModel
from nanocp.router.placement import InstanceLoad
from nanocp.router.policies.balanced import BalancedPolicy
from nanocp.router.policies.dcp import DCPPolicy
from nanocp.router.policies.static import StaticPolicy
from nanocp.router.policies.uniform import UniformPolicy

PAGE = 16


def load(
    id: str, rank: int, committed: int = 0, home: int = 0, total: int = 100, domain: str = "", group: str = "g"
) -> InstanceLoad:
    return InstanceLoad(id, PAGE, total, committed, home, group=group, rank=rank, domain=domain)


FOUR = [load("a", 0), load("b", 1), load("c", 2), load("d", 3)]
# Routing costs as much as 1000 KV tokens a row: a short request stays local, a long one is worth splitting.
COST = CostModel(kv_token_ms=1e-3, home_token_ms=0.1, routed_row_ms=1.0, fixed_ms=0.0)


CHEAP_ROUTES = CostModel(kv_token_ms=1e-3, home_token_ms=0.1, routed_row_ms=1e-6, fixed_ms=0.0)


@pytest.mark.parametrize(
    ("footprint", "instances", "expected"),
    [
        pytest.param(
            Footprint(100, 29), FOUR, Placement("a", [Shard(0, 0, 8, "a")]), id="short_request_stays_on_its_home"
        ),
        pytest.param(
            Footprint(2000, 49),
            FOUR,
            Placement("a", [Shard(0, 0, 64, "a"), Shard(1, 1024, 64, "b")]),
            id="long_request_split_where_its_route_costs_less_than_its_kv",
        ),
        pytest.param(
            Footprint(2000, 49),
            [load("a", 0, home=0, committed=90), load("b", 1, home=1), load("c", 2, home=1, committed=10)],
            Placement("b", [Shard(1, 0, 64, "b"), Shard(2, 1024, 64, "c")]),
            id="fits_nowhere_whole_home_and_shards_with_the_least_work",
        ),
        pytest.param(
            Footprint(2000, 49),
            [load("a", 0, domain="x"), load("b", 1, domain="y"), load("c", 2, domain="x", committed=30)],
            Placement("a", [Shard(0, 0, 64, "a"), Shard(2, 1024, 64, "c")]),
            id="home_domain_before_less_work_elsewhere",
        ),
        pytest.param(
            Footprint(100, 29),
            [load("a", 0, home=0, committed=100), load("b", 1, home=3)],
            Placement("b", [Shard(1, 0, 8, "b")]),
            id="short_request_where_balanced_puts_it",
        ),
        pytest.param(Footprint(4000, 97), [load("a", 0), load("b", 1)], None, id="nothing_fits_now"),
        pytest.param(
            Footprint(2000, 49),
            [load("a", 0), load("b", 1, group="h"), load("c", 2)],
            Placement("a", [Shard(0, 0, 64, "a"), Shard(2, 1024, 64, "c")]),
            id="shards_stay_in_the_home_group",
        ),
    ],
)
def test_dcp_places_by_predicted_group_step(
    footprint: Footprint, instances: list[InstanceLoad], expected: Placement | None
) -> None:
    assert DCPPolicy(shard_tokens=1024, max_degree=4, cost=COST).place(footprint, instances) == expected


def test_dcp_splits_only_as_far_as_the_cost_model_predicts_a_faster_group() -> None:
    roomy = [load(i, rank, total=1000) for rank, i in enumerate("abcd")]
    placement = DCPPolicy(shard_tokens=256, max_degree=4, cost=CHEAP_ROUTES).place(Footprint(2000, 49), roomy)
    assert placement is not None and placement.cp_degree == 4
    expensive_routes = CostModel(kv_token_ms=1e-3, home_token_ms=0.1, routed_row_ms=1e3, fixed_ms=0.0)
    placement = DCPPolicy(shard_tokens=256, max_degree=4, cost=expensive_routes).place(Footprint(2000, 49), roomy)
    assert placement == BalancedPolicy(expensive_routes).place(Footprint(2000, 49), roomy)
    slow_route = CostModel(kv_token_ms=1e-3, home_token_ms=0.1, routed_row_ms=1e-6, fixed_ms=0.0, cp_step_ms=5.0)
    placement = DCPPolicy(shard_tokens=256, max_degree=4, cost=slow_route).place(Footprint(2000, 49), roomy)
    assert placement is not None and placement.cp_degree == 1, "a route's latency outweighs 2048 tokens of KV"


def test_dcp_splits_no_further_than_its_shard_tokens_allow() -> None:
    roomy = [load(i, rank, total=1000) for rank, i in enumerate("abcd")]
    placement = DCPPolicy(shard_tokens=1000, max_degree=4, cost=CHEAP_ROUTES).place(Footprint(2000, 49), roomy)
    assert placement is not None and placement.cp_degree == 2, "2048 tokens hold two shards of 1000, not three"


def test_a_route_is_priced_group_wide_even_when_the_slowest_instance_takes_no_part() -> None:
    # a is the slowest (3000 KV tokens) and routes nothing; a split between c and d still slows a's step.
    loads = [load("a", 0, committed=187, total=1000), load("b", 1), load("c", 2), load("d", 3)]
    split = Placement("c", [Shard(2, 0, 10, "c"), Shard(3, 160, 10, "d")])
    own_a = COST.own_ms(loads[0])
    assert COST.scorer(loads)(split) == pytest.approx(own_a + COST.routed_row_ms)
    assert COST.group_ms(loads) == pytest.approx(own_a)


def test_the_group_step_counts_kv_batch_and_the_busiest_routes() -> None:
    split = Placement("a", [Shard(0, 0, 10, "a"), Shard(1, 160, 10, "b")])
    # a: 160 KV tokens + 1 home token; b: 160 KV tokens; one routed row at both ends.
    assert COST.scorer([load("a", 0), load("b", 1)])(split) == pytest.approx(0.16 + 0.1 + 1.0)


@pytest.mark.parametrize(
    ("degree", "expected"),
    [
        (1, Placement("a", [Shard(0, 0, 8, "a")])),
        (2, Placement("a", [Shard(0, 0, 4, "a"), Shard(1, 64, 4, "b")])),
        (8, Placement("a", [Shard(0, 0, 2, "a"), Shard(1, 32, 2, "b"), Shard(2, 64, 2, "c"), Shard(3, 96, 2, "d")])),
    ],
)
def test_uniform_puts_every_request_at_its_degree_capped_by_the_group(degree: int, expected: Placement) -> None:
    assert UniformPolicy(degree).place(Footprint(100, 29), FOUR) == expected


def test_cost_model_fit_recovers_the_coefficients_of_its_samples() -> None:
    truth = CostModel(kv_token_ms=2e-3, home_token_ms=0.3, routed_row_ms=0.7, fixed_ms=1.5)
    samples = [
        (kv, home, rows, truth.step_ms(InstanceLoad("x", 1, 10**6, kv, home, rows)))
        for kv in (0, 500, 3000)
        for home in (0, 4, 9)
        for rows in (0, 2, 5)
    ]
    fitted = CostModel.fit(samples)
    for name in ("kv_token_ms", "home_token_ms", "routed_row_ms", "fixed_ms"):
        assert getattr(fitted, name) == pytest.approx(getattr(truth, name), rel=1e-6)


GROWING = Placement("a", [Shard(0, 0, 4, "a")])  # 64 tokens on a


@pytest.mark.parametrize(
    ("policy", "instances", "expected"),
    [
        pytest.param(StaticPolicy(), FOUR, Placement("a", [Shard(0, 0, 6, "a")]), id="static_grows_the_tail_in_place"),
        pytest.param(
            DCPPolicy(shard_tokens=128, max_degree=4, cost=COST),
            FOUR,
            Placement("a", [Shard(0, 0, 6, "a")]),
            id="dcp_tail_within_target_grows_in_place",
        ),
        pytest.param(
            DCPPolicy(shard_tokens=64, max_degree=4, cost=CHEAP_ROUTES),
            [load("a", 0, committed=4, home=1), load("b", 1, committed=5), load("c", 2)],
            Placement("a", [Shard(0, 0, 4, "a"), Shard(2, 64, 2, "c")]),
            id="dcp_past_target_adds_a_shard_on_the_least_busy_when_predicted_faster",
        ),
        pytest.param(
            DCPPolicy(shard_tokens=64, max_degree=4, cost=COST),
            [load("a", 0, committed=4, home=1), load("b", 1, committed=5), load("c", 2)],
            Placement("a", [Shard(0, 0, 6, "a")]),
            id="dcp_past_target_grows_the_tail_when_a_route_costs_more",
        ),
        pytest.param(
            DCPPolicy(shard_tokens=64, max_degree=1, cost=COST),
            FOUR,
            Placement("a", [Shard(0, 0, 6, "a")]),
            id="dcp_at_its_degree_cap_grows_the_tail_past_target",
        ),
        pytest.param(StaticPolicy(), [load("a", 0, committed=99)], None, id="no_room_to_grow"),
    ],
)
def test_policies_grow_placements_without_moving_kv(
    policy: StaticPolicy | DCPPolicy, instances: list[InstanceLoad], expected: Placement | None
) -> None:
    assert policy.grow(GROWING, 2, instances) == expected


def test_balanced_homes_a_request_where_the_predicted_slowest_instance_is_fastest() -> None:
    # b has fewer requests (static would pick it) but far more KV: a's step is predicted faster.
    loads = [load("a", 0, committed=10, home=3), load("b", 1, committed=90, home=1)]
    placement = BalancedPolicy(COST).place(Footprint(100, 29), loads)
    assert placement == Placement("a", [Shard(0, 0, 8, "a")])
    assert StaticPolicy().place(Footprint(100, 29), loads) == Placement("b", [Shard(1, 0, 8, "b")])


def test_balanced_never_splits_and_waits_when_nothing_fits() -> None:
    placement = BalancedPolicy(COST).place(Footprint(1000, 500), FOUR)
    assert placement is not None and placement.cp_degree == 1
    assert BalancedPolicy(COST).place(Footprint(4000, 97), FOUR) is None
