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
            id="long_request_split_to_the_shard_target",
        ),
        pytest.param(
            Footprint(2000, 49),
            [load("a", 0, home=0, committed=90), load("b", 1, home=1), load("c", 2, home=1, committed=10)],
            Placement("a", [Shard(1, 0, 64, "b"), Shard(2, 1024, 64, "c")]),
            id="home_by_batch_shards_by_free_kv_home_full",
        ),
        pytest.param(
            Footprint(2000, 49),
            [load("a", 0, domain="x"), load("b", 1, domain="y"), load("c", 2, domain="x", committed=30)],
            Placement("a", [Shard(0, 0, 64, "a"), Shard(2, 1024, 64, "c")]),
            id="home_domain_before_more_free_kv_elsewhere",
        ),
        pytest.param(
            Footprint(100, 29),
            [load("a", 0, home=0, committed=100), load("b", 1, home=3)],
            Placement("a", [Shard(1, 0, 8, "b")]),
            id="light_home_full_kv_holds_its_short_request_elsewhere",
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
def test_dcp_places_by_footprint_batch_and_kv(
    footprint: Footprint, instances: list[InstanceLoad], expected: Placement | None
) -> None:
    assert DCPPolicy(shard_tokens=1024, max_degree=4, cost=COST).place(footprint, instances) == expected


def test_dcp_goes_past_the_minimum_degree_when_that_lowers_the_slowest_instance() -> None:
    roomy = [load(i, rank, total=1000) for rank, i in enumerate("abcd")]
    cheap_routes = CostModel(kv_token_ms=1e-3, home_token_ms=0.1, routed_row_ms=1e-6, fixed_ms=0.0)
    placement = DCPPolicy(shard_tokens=100_000, max_degree=4, cost=cheap_routes).place(Footprint(2000, 49), roomy)
    assert placement is not None and placement.cp_degree == 4
    expensive_routes = CostModel(kv_token_ms=1e-3, home_token_ms=0.1, routed_row_ms=1e3, fixed_ms=0.0)
    placement = DCPPolicy(shard_tokens=100_000, max_degree=4, cost=expensive_routes).place(Footprint(2000, 49), roomy)
    assert placement is not None and placement.cp_degree == 1


def test_dcp_prediction_counts_kv_batch_and_routed_rows_on_every_instance() -> None:
    policy = DCPPolicy(cost=COST)
    split = Placement("a", [Shard(0, 0, 10, "a"), Shard(1, 160, 10, "b")])
    # a: 160 KV tokens + 1 home token + 1 routed row; b: 160 KV tokens + 1 routed row.
    assert policy.cost.slowest_ms(split, [load("a", 0), load("b", 1)]) == pytest.approx(0.16 + 0.1 + 1.0)


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
            DCPPolicy(shard_tokens=64, max_degree=4, cost=COST),
            [load("a", 0), load("b", 1, committed=50), load("c", 2)],
            Placement("a", [Shard(0, 0, 4, "a"), Shard(2, 64, 2, "c")]),
            id="dcp_past_target_adds_a_shard_on_the_freest",
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
