"""Properties of placements, for any loads and requests (hypothesis): what every policy must never get wrong."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from nanocp.placement import Footprint, Placement, check_growth, check_shards, shard_ends
from nanocp.router.accounting import Ledger
from nanocp.router.placement import InstanceLoad
from nanocp.router.policies import make_policy
from nanocp.worker.kv_cache import PagePool, ShardStore

PAGE = 16
MAX_DEGREE = 3
POLICIES = {
    "static": make_policy("static"),
    "balanced": make_policy("balanced"),
    "uniform": make_policy("uniform", cp_degree=MAX_DEGREE),
    "dcp": make_policy("dcp", shard_tokens=256, max_degree=MAX_DEGREE),
}
CAPS = {"static": 1, "balanced": 1, "uniform": MAX_DEGREE, "dcp": MAX_DEGREE}


@st.composite
def instances(draw: st.DrawFn) -> list[InstanceLoad]:
    count = draw(st.integers(1, 6))
    loads = []
    for i in range(count):
        total = draw(st.integers(1, 200))
        loads.append(
            InstanceLoad(
                f"i{i}",
                PAGE,
                total,
                pages_committed=draw(st.integers(0, total)),
                home_batch=draw(st.integers(0, 8)),
                group=draw(st.sampled_from(["g", "g", "h"])),
                rank=i,
                domain=draw(st.sampled_from(["x", "y"])),
            )
        )
    return loads


footprints = st.builds(Footprint, st.integers(1, 3000), st.integers(1, 500))


def check(placement: Placement, footprint: Footprint, loads: list[InstanceLoad], cap: int) -> None:
    by_id = {i.id: i for i in loads}
    holders = [s.instance for s in placement.shards]
    assert len(set(holders)) == len(holders), "shards on distinct instances"
    assert 1 <= placement.cp_degree <= cap
    assert {by_id[h].group for h in holders} == {by_id[placement.home].group}, "shards stay in the home's group"
    for shard in placement.shards:
        assert shard.page_quota <= by_id[shard.instance].pages_free, "a quota never exceeds free pages"
        assert shard.rank == by_id[shard.instance].rank
    assert check_shards(placement.shards, len(loads), PAGE) is None
    # Every position of the footprint lies in exactly one shard: contiguous from 0, covering every token.
    ends = shard_ends(placement.shards, PAGE)
    assert [s.start for s in placement.shards[1:]] == ends[:-1]
    assert ends[-1] >= footprint.tokens


@settings(max_examples=300, deadline=None)
@given(loads=instances(), footprint=footprints, policy=st.sampled_from(list(POLICIES)))
def test_every_placement_covers_each_position_once_within_free_pages_and_the_degree_cap(
    loads: list[InstanceLoad], footprint: Footprint, policy: str
) -> None:
    placement = POLICIES[policy].place(footprint, loads)
    if placement is not None:
        check(placement, footprint, loads, CAPS[policy])


@settings(max_examples=100, deadline=None)
@given(
    loads=instances(),
    requests=st.lists(footprints, min_size=1, max_size=12),
    policy=st.sampled_from(list(POLICIES)),
)
def test_the_ledger_is_back_to_zero_after_every_placement_is_released(
    loads: list[InstanceLoad], requests: list[Footprint], policy: str
) -> None:
    ledger = Ledger()
    placed = []
    for footprint in requests:
        current = [
            InstanceLoad(
                i.id,
                i.page_size,
                i.pages_total,
                ledger.pages_committed(i.id),
                ledger.home_batch(i.id),
                group=i.group,
                rank=i.rank,
                domain=i.domain,
            )
            for i in loads
        ]
        placement = POLICIES[policy].place(footprint, current)
        if placement is not None:
            check(placement, footprint, current, CAPS[policy])
            ledger.commit(placement)
            placed.append(placement)
    for i in loads:
        assert ledger.pages_committed(i.id) <= i.pages_total, "grants never exceed an instance's pages"
    for placement in placed:
        ledger.release(placement)
    assert all(ledger.pages_committed(i.id) == 0 and ledger.home_batch(i.id) == 0 for i in loads)


@settings(max_examples=200, deadline=None)
@given(
    shards=st.lists(st.tuples(st.integers(0, 5), st.integers(0, 3), st.integers(1, 6)), max_size=20),
    frees=st.lists(st.integers(0, 5), max_size=10),
)
def test_a_holder_gives_back_every_page_and_quota_of_the_requests_it_frees(
    shards: list[tuple[int, int, int]], frees: list[int]
) -> None:
    pool = PagePool(200)
    store = ShardStore(pool, PAGE)
    for key, index, quota in shards:
        opened = store.open(key, index, quota)
        store.pages_for(key, index, opened.quota * PAGE)  # fill it
        assert pool.num_in_use <= pool.committed <= pool.num_pages
    for key in frees:
        store.free(key)
    for key, _, _ in shards:
        store.free(key)
    assert pool.num_free == pool.num_pages and pool.committed == 0


@settings(max_examples=200, deadline=None)
@given(
    loads=instances(),
    footprint=footprints,
    pages=st.integers(1, 40),
    policy=st.sampled_from(list(POLICIES)),
)
def test_a_grown_placement_keeps_its_kv_in_place_within_free_pages_and_the_cap(
    loads: list[InstanceLoad], footprint: Footprint, pages: int, policy: str
) -> None:
    placement = POLICIES[policy].place(footprint, loads)
    if placement is None:
        return
    after = [
        replace(
            i, pages_committed=i.pages_committed + sum(s.page_quota for s in placement.shards if s.instance == i.id)
        )
        for i in loads
    ]
    grown = POLICIES[policy].grow(placement, pages, after)
    if grown is None:
        return
    assert check_growth(placement.shards, grown.shards) is None
    assert sum(s.page_quota for s in grown.shards) == sum(s.page_quota for s in placement.shards) + pages
    added = {s.instance: s.page_quota for s in grown.shards}
    for s in placement.shards:
        added[s.instance] -= s.page_quota
    by_id = {i.id: i for i in after}
    assert all(n <= by_id[i].pages_free for i, n in added.items()), "growth fits the free pages"
    assert grown.cp_degree <= CAPS[policy]
