"""The planner sizes every route of a step on the host, from the chunks at the home and the metadata rows at the
holder: nothing in the forward has to read a size back from the device."""

from __future__ import annotations

from nanocp.placement import Shard
from nanocp.worker.kv_cache import PagePool, ShardStore
from nanocp.worker.planner import Meta, StepPlanner
from nanocp.worker.request import Request, SamplingParams
from nanocp.worker.scheduler import Chunk

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
