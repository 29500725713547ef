"""StaticPolicy, table-driven: which home it picks, what quota it grants, and when nothing fits."""

from __future__ import annotations

import pytest

from nanocp.placement import Footprint, Placement, Shard
from nanocp.router.placement import InstanceLoad
from nanocp.router.policies import make_policy
from nanocp.router.policies.static import StaticPolicy
from nanocp.wire import placement_from_proto, placement_to_proto


def load(id: str, committed: int = 0, home: int = 0, total: int = 100, page_size: int = 16) -> InstanceLoad:
    return InstanceLoad(id, page_size, total, pages_committed=committed, home_batch=home)


@pytest.mark.parametrize(
    ("footprint", "instances", "expected"),
    [
        pytest.param(
            Footprint(10, 7), [load("a")], Placement("a", [Shard(0, 0, 1, "a")]), id="16_tokens_take_one_page"
        ),
        pytest.param(
            Footprint(10, 8), [load("a")], Placement("a", [Shard(0, 0, 2, "a")]), id="17_tokens_take_two_pages"
        ),
        pytest.param(
            Footprint(100, 29),
            [load("a", page_size=32)],
            Placement("a", [Shard(0, 0, 4, "a")]),
            id="page_size_per_home",
        ),
        pytest.param(
            Footprint(10, 10),
            [load("a", home=3), load("b", home=1), load("c", home=2)],
            Placement("b", [Shard(0, 0, 2, "b")]),
            id="fewest_home_requests_wins",
        ),
        pytest.param(
            Footprint(10, 10),
            [load("a", home=1, committed=50), load("b", home=1, committed=20)],
            Placement("b", [Shard(0, 0, 2, "b")]),
            id="tie_goes_to_most_free_kv",
        ),
        pytest.param(
            Footprint(10, 10),
            [load("b"), load("a")],
            Placement("a", [Shard(0, 0, 2, "a")]),
            id="full_tie_goes_to_smallest_id",
        ),
        pytest.param(
            Footprint(10, 10),
            [load("a", home=0, committed=99), load("b", home=5)],
            Placement("b", [Shard(0, 0, 2, "b")]),
            id="an_instance_without_room_is_skipped",
        ),
        pytest.param(
            Footprint(10, 10),
            [load("a", committed=98)],
            Placement("a", [Shard(0, 0, 2, "a")]),
            id="exact_fit_is_placed",
        ),
        pytest.param(Footprint(10, 10), [load("a", committed=99), load("b", committed=99)], None, id="nothing_fits"),
        pytest.param(Footprint(10, 10), [], None, id="no_instances"),
    ],
)
def test_static_policy_places_on_the_least_loaded_instance_with_room(
    footprint: Footprint, instances: list[InstanceLoad], expected: Placement | None
) -> None:
    assert StaticPolicy().place(footprint, instances) == expected


def test_static_policy_never_uses_context_parallelism() -> None:
    placement = StaticPolicy().place(Footprint(1000, 1000), [load("a", total=200), load("b", total=200)])
    assert placement is not None and placement.cp_degree == 1 and placement.shards[0].instance == placement.home


def test_make_policy_names_the_known_policies_when_asked_for_an_unknown_one() -> None:
    names = ("static", "balanced", "dcp", "uniform")
    assert [make_policy(n).name for n in names] == list(names)
    with pytest.raises(ValueError, match=r"unknown placement policy 'ring'.*static, balanced, dcp, uniform"):
        make_policy("ring")


def test_placement_round_trips_through_its_proto() -> None:
    placement = Placement("a", [Shard(0, 0, 3, "a"), Shard(0, 48, 2, "b")])
    assert placement_from_proto(placement_to_proto(placement)) == placement
