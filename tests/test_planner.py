"""The planner sizes every route of a step on the host, from the chunks at the home and the metadata rows at the
holder: nothing in the forward has to read a size back from the device."""

from __future__ import annotations

from nanocp.placement import Shard
from nanocp.worker.kv_cache import PagePool, ShardStore
from nanocp.worker.planner import StepPlanner
from nanocp.worker.request import Request, SamplingParams
from nanocp.worker.scheduler import Chunk
from nanocp.worker.step_meta import Meta

PAGE = 4


def cp_request(key: int, prompt_tokens: int) -> Request:
    """A request whose first 8 positions live on rank 0 (its home) and the rest on rank 1, its tail."""
    shards = [Shard(0, 0, 2), Shard(1, 8, 4)]
    params = SamplingParams(temperature=0.0, max_tokens=8)
    return Request(f"r{key}", list(range(1, prompt_tokens + 1)), params, lambda _: None, frozenset(), shards, 24, key)


def planners() -> tuple[StepPlanner, StepPlanner]:
    return tuple(StepPlanner(ShardStore(PagePool(32), PAGE), rank, 2, "cpu") for rank in (0, 1))  # type: ignore[return-value]


def test_a_cp_chunks_routes_are_sized_on_the_host_at_both_ends() -> None:
    home, holder = planners()
    request = cp_request(key=7, prompt_tokens=12)
    request.num_computed = 8  # the first shard is full: the chunk's 4 rows go to the tail on rank 1
    chunks = [Chunk(request, 4)]
    out = home.outgoing(chunks, frees={1: [3]})
    assert out.meta[0] == [] and out.meta[1][0][Meta.FREE] == 1, "frees go first"
    announced = out.meta[1][1]
    assert (announced[Meta.ROWS], announced[Meta.KV_LEN], announced[Meta.APPENDS]) == (4, 4, 1)

    at_home = home.build(chunks, out, incoming=[[], []], cp_routes=True).plan.routes
    at_holder = holder.build([], holder.outgoing([], {}), incoming=[out.meta[1], []], cp_routes=True).plan.routes
    assert at_home is not None and at_holder is not None
    assert (at_home.queries.send_rows, at_home.queries.recv_rows) == ([0, 4], [0, 0])
    assert (at_home.kv.send_rows, at_home.kv.recv_rows) == ([0, 4], [0, 0])
    assert (at_holder.queries.send_rows, at_holder.queries.recv_rows) == ([0, 0], [4, 0])
    assert (at_holder.kv.send_rows, at_holder.kv.recv_rows) == ([0, 0], [4, 0])
    sizes = [*at_home.queries.send_rows, *at_holder.queries.recv_rows, *at_home.kv.send_rows]
    assert all(type(size) is int for size in sizes), "plain host integers, not device tensors"
    assert at_holder.kv_slots.tolist() == holder.store.slots(7, 1, 0, 4), "the tail's K, V land on its holder"


def test_rows_on_the_home_only_take_no_route_and_attend_locally() -> None:
    home, _ = planners()
    request = cp_request(key=9, prompt_tokens=6)
    inputs = home.build([Chunk(request, 6)], home.outgoing([Chunk(request, 6)], {}), [[], []], cp_routes=False)
    assert inputs.plan.routes is None
    assert inputs.plan.local_slots.tolist() == home.store.slots(9, 0, 0, 6)
    assert inputs.sample_rows.tolist() == [5] and inputs.sampling.draws == [0]


def test_a_step_without_cp_attends_its_rows_in_order_with_nothing_to_merge() -> None:
    """Chunks and decodes on their home, no route anywhere: one attention call's rows are the output (no merge
    layout); a CP chunk's step keeps its merge."""
    home, _ = planners()
    first, second = cp_request(key=3, prompt_tokens=5), cp_request(key=4, prompt_tokens=3)
    chunks = [Chunk(first, 5), Chunk(second, 3)]
    plan = home.build(chunks, home.outgoing(chunks, {}), [[], []], cp_routes=False).plan
    assert plan.merge_index is None and len(plan.groups) == 1
    request = cp_request(key=7, prompt_tokens=12)
    request.num_computed = 8
    cp_chunks = [Chunk(request, 4)]
    cp_plan = home.build(cp_chunks, home.outgoing(cp_chunks, {}), [[], []], cp_routes=True).plan
    assert cp_plan.merge_index is not None


def test_kv_slots_cross_pages_in_order() -> None:
    """A run of positions maps to its pages' slots in order, across page boundaries, whatever pages it took."""
    store = ShardStore(PagePool(32), PAGE)
    store.open(1, 0, 8)
    store.pages_for(1, 0, 3)  # another request takes pages between this one's
    store.open(2, 0, 8)
    store.pages_for(2, 0, 9)
    store.pages_for(1, 0, 14)
    pages = store.pages_for(1, 0, 14)
    for first, count in ((0, 14), (2, 7), (3, 1), (4, 4), (13, 1), (5, 0)):
        expected = [pages[p // PAGE] * PAGE + p % PAGE for p in range(first, first + count)]
        assert store.slots(1, 0, first, count) == expected


def test_a_holder_that_cannot_commit_a_quota_opens_nothing_and_tells_the_home() -> None:
    """A placement the router never makes: rank 1 is asked for 4 pages with 2 uncommitted. It opens nothing, the
    rows attend nothing there and their K, V land nowhere, and its next step's rows tell the home (after frees)."""
    home, holder = planners()
    holder.store.pool.commit(30)
    request = cp_request(key=7, prompt_tokens=12)
    request.num_computed = 8
    chunks = [Chunk(request, 4)]
    out = home.outgoing(chunks, frees={})
    assert out.opens_remote, "the holder sees this quota for the first time"

    at_holder = holder.build([], holder.outgoing([], {}), incoming=[out.meta[1], []], cp_routes=True)
    assert holder.store.quota(7, 1) == 0 and holder.store.pool.committed == 30, "nothing opened or committed"
    assert at_holder.plan.routes is not None and at_holder.plan.routes.kv_slots.tolist() == [-1] * 4
    ((metadata, _),) = at_holder.plan.groups
    assert metadata.kv_lens == [0], "the refused rows attend no key"
    assert holder.has_refusals

    told = holder.outgoing([], frees={0: [5]}).meta[0]
    assert [row[Meta.FREE] for row in told] == [1, 0] and told[1][Meta.REFUSED] == 1
    assert (told[1][Meta.KEY], told[1][Meta.SHARD], told[1][Meta.QUOTA]) == (7, 1, 4)
    assert not holder.has_refusals, "a refusal is told once"
    at_home = home.build([], home.outgoing([], {}), incoming=[[], told], cp_routes=False)
    assert at_home.refused == [(1, told[1])]
    assert not home.outgoing(chunks, frees={}).opens_remote, "the same quota again asks nothing new"


def test_a_static_step_keeps_a_refused_row_padding_and_the_next_kv_slot_in_order() -> None:
    """At a graph bucket's shapes: the refused decode stays a padding row at the holder and stores nothing, while
    the next decode's K, V still land in its own slot."""
    home, holder = planners()
    refused, held = cp_request(key=7, prompt_tokens=9), cp_request(key=8, prompt_tokens=9)
    for request in (refused, held):
        request.num_computed = 9
    refused.shards = [Shard(0, 0, 2), Shard(1, 8, 30)]  # 30 pages: more than rank 1 has once the other holds 4
    refused.coverage = 8 + 30 * PAGE
    chunks = [Chunk(held, 1), Chunk(refused, 1)]
    out = home.outgoing(chunks, frees={})
    at_holder = holder.build([], holder.outgoing([], {}), [out.meta[1], []], cp_routes=True, static_rows=2)
    plan = at_holder.plan
    assert plan.routes is not None and plan.received is not None
    assert plan.routes.kv_slots.tolist()[:2] == [holder.store.slots(8, 1, 1, 1)[0], -1]
    assert holder.store.quota(7, 1) == 0 and holder.has_refusals
