"""The simulator's event loop: it places with the router's own objects, sees only what the router sees, ends requests
at their true length, and its shortcuts (aggregates, events, idle jumps) keep the group's accounting exact."""

from __future__ import annotations

import math
from typing import Any

import pytest

from nanocp.placement import Footprint, Placement
from nanocp.router.placement import InstanceLoad, PlacementPolicy
from nanocp.router.policies import make_policy
from nanocp.sim import cluster as cluster_module
from nanocp.sim.cluster import Cluster, PolicySpec
from nanocp.sim.hardware import DEVICES, LINKS
from nanocp.sim.loop import Simulation, simulate
from nanocp.sim.shapes import SHAPES
from nanocp.sim.steptime import Coefficients
from nanocp.workload import TraceRequest, at_rate, long_tailed

QWEN = SHAPES["qwen3-30b-a3b"]


def cluster(instances: int = 4, kv_pages: int = 4096, **kw: Any) -> Cluster:
    return Cluster(QWEN, DEVICES["h100"], LINKS["nvlink"], instances, Coefficients(), kv_pages=kv_pages, **kw)


class Spy:
    """A router policy that records what the simulator asks it."""

    def __init__(self, policy: PlacementPolicy) -> None:
        self.policy = policy
        self.name = policy.name
        self.placed: list[Footprint] = []
        self.grown: list[tuple[Placement, int]] = []

    def place(self, footprint: Footprint, instances: list[InstanceLoad]) -> Placement | None:
        self.placed.append(footprint)
        return self.policy.place(footprint, instances)

    def grow(self, placement: Placement, pages: int, instances: list[InstanceLoad]) -> Placement | None:
        self.grown.append((placement, pages))
        return self.policy.grow(placement, pages, instances)

    def reservation(self, footprint: Footprint, instances: list[InstanceLoad]) -> dict[str, int]:
        return self.policy.reservation(footprint, instances)


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> list[Spy]:
    """Every policy the simulator builds, wrapped in a Spy (the router's make_policy still builds it)."""
    made: list[Spy] = []

    def make(name: str, **kw: Any) -> Spy:
        made.append(Spy(make_policy(name, **kw)))
        return made[-1]

    monkeypatch.setattr(cluster_module, "make_policy", make)
    return made


def test_placements_come_from_the_routers_policy_which_sees_max_tokens_not_the_true_output(spy: list[Spy]) -> None:
    requests = [TraceRequest(0.01 * i, 1000 + 100 * i, 20 + i) for i in range(10)]
    result = simulate(cluster(), PolicySpec("dcp", shard_tokens=512), requests, max_tokens=256)
    assert {f.max_tokens for f in spy[0].placed} == {256}
    assert {f.prompt_tokens for f in spy[0].placed} == {r.input_tokens for r in requests}
    assert [o.status for o in result.outcomes] == ["ok"] * 10
    assert all(o.cp_degree == 1 for o in result.outcomes), "a route costs more than 2000 tokens of KV balance"


def test_a_lone_request_decodes_one_token_a_step_and_ends_at_its_true_length() -> None:
    group = cluster()
    simulation = Simulation(group, PolicySpec("static"), max_tokens=512)
    result = simulation.run([TraceRequest(5.0, 3000, 40)])
    (outcome,) = result.outcomes
    assert result.steps.steps == 39, "the first token comes with the KV; the group decodes the other 39"
    assert outcome.tpot_s == pytest.approx(result.steps.busy_s / 39)
    assert outcome.placed_s == 5.0, "the idle group jumps to the arrival"
    model = group.step_model()
    first = model.step([1, 0, 0, 0], [3001, 0, 0, 0], [0] * 4).step_s
    last = model.step([1, 0, 0, 0], [3039, 0, 0, 0], [0] * 4).step_s
    assert first <= outcome.tpot_s <= last


def test_every_page_and_aggregate_is_back_to_zero_when_the_workload_ends() -> None:
    requests = at_rate(long_tailed(300, seed=3, max_input=40_000), 40.0)
    for policy in (PolicySpec("static"), PolicySpec("dcp", shard_tokens=4096), PolicySpec("uniform", 4)):
        simulation = Simulation(cluster(kv_pages=6000), policy, max_tokens=512, reserve_output_tokens=64)
        result = simulation.run(requests)
        assert all(o.status in ("ok", "refused", "exhausted") for o in result.outcomes)
        for instance in simulation.capacities:
            assert simulation.ledger.pages_committed(instance.id) == 0, policy
            assert simulation.ledger.home_batch(instance.id) == 0, policy
        assert simulation.home == simulation.kv == simulation.tails == simulation.rows == [0] * 4


def test_a_reservation_grows_as_the_request_decodes_and_dcp_grows_by_adding_shards(spy: list[Spy]) -> None:
    # 1000 prompt tokens + 32 reserved on instances of 70 pages (1120 tokens): 1399 tokens in the end need a shard
    # more, on another instance, when the tail's holder is full.
    request = TraceRequest(0.0, 1000, 400)
    policy = PolicySpec("dcp", shard_tokens=400, max_degree=8)
    result = simulate(cluster(kv_pages=70), policy, [request], max_tokens=400, reserve_output_tokens=32)
    (outcome,) = result.outcomes
    assert outcome.status == "ok"
    assert spy[0].grown, "the home asked for pages before its tail filled"
    assert all(pages <= 2 for _, pages in spy[0].grown), "32 tokens at a time, or what is still missing"
    assert outcome.cp_degree > spy[0].grown[0][0].cp_degree


def test_no_room_to_grow_ends_the_request_as_resource_exhausted() -> None:
    # One instance of 40 pages; two requests that each end up needing 32 (placed with 14, growing a page at a time):
    # the first that finds no room ends, which leaves room for the other.
    requests = [TraceRequest(0.0, 200, 300), TraceRequest(0.0, 200, 300)]
    result = simulate(
        cluster(instances=1, kv_pages=40), PolicySpec("static"), requests, max_tokens=300, reserve_output_tokens=16
    )
    assert sorted(o.status for o in result.outcomes) == ["exhausted", "ok"]


def test_a_request_larger_than_an_instance_is_refused_by_static_and_spread_by_dcp() -> None:
    requests = [TraceRequest(0.0, 3000, 10)]  # 189 pages; an instance holds 100
    static = simulate(cluster(kv_pages=100), PolicySpec("static"), requests, max_tokens=10)
    dcp = simulate(cluster(kv_pages=100), PolicySpec("dcp", shard_tokens=1024), requests, max_tokens=10)
    assert static.outcomes[0].status == "refused"
    assert dcp.outcomes[0].status == "ok" and dcp.outcomes[0].cp_degree >= 2


def test_requests_wait_for_memory_and_a_small_one_that_fits_goes_ahead() -> None:
    # One instance of 100 pages; each large request takes 70: the second waits for the first to end.
    requests = [TraceRequest(0.0, 1000, 100), TraceRequest(0.001, 1000, 100), TraceRequest(0.002, 10, 5)]
    result = simulate(cluster(instances=1, kv_pages=100), PolicySpec("static"), requests, max_tokens=100)
    first, second, small = result.outcomes
    assert second.placed_s == pytest.approx(first.finished_s)
    assert small.placed_s < second.placed_s, "the small one fits beside the first: it goes ahead of the second"
    assert second.wait_s > 0 and math.isfinite(second.tpot_s)


def test_chunked_prefill_feeds_the_prompt_in_budget_sized_chunks_before_the_first_token() -> None:
    group = cluster(prefill="chunked", max_step_tokens=512)
    result = simulate(group, PolicySpec("static"), [TraceRequest(0.0, 1200, 5)], max_tokens=5)
    assert result.steps.steps == 3 + 4, "1200 prompt tokens in chunks of 512, then 4 decode steps"
    assert result.outcomes[0].ttft_s < result.outcomes[0].finished_s
