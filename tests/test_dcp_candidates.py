"""dcp against its own baseline, for any loads, request and cost model (hypothesis): `balanced`'s placement is always
among dcp's candidates, and dcp splits only when its cost model predicts the group's step gets faster."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from nanocp.placement import Footprint
from nanocp.router.cost import CostModel
from nanocp.router.placement import InstanceLoad
from nanocp.router.policies.balanced import BalancedPolicy
from nanocp.router.policies.dcp import DCPPolicy

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
