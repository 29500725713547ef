"""The routing layer's fixed-capacity buffers: a row's slot lies in its destination's share and no two rows share
one, so with the capacity a step is given (its largest home batch x top-k) no routing can overflow; adversarial
routing (every token to the experts of one instance) gives the same tokens as a lone instance."""

from __future__ import annotations

from collections.abc import Callable

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nanocp.harness.offline_group import OfflineRequest, run_alone, run_group
from nanocp.worker.engine import Engine, EngineConfig
from nanocp.worker.model import SparseMoE
from nanocp.worker.request import SamplingParams
from nanocp.worker.routing import FixedRoute, slots_by_destination

Routed = tuple[torch.Tensor, torch.Tensor]
CONFIG = EngineConfig(page_size=8, num_pages=128, max_step_tokens=32, max_running=8)


@settings(max_examples=200, deadline=None)
@given(
    peers=st.integers(1, 8),
    tokens=st.integers(0, 40),
    top_k=st.integers(1, 4),
    data=st.data(),
)
def test_every_routing_of_a_batch_fits_the_capacity_of_its_bucket(
    peers: int, tokens: int, top_k: int, data: st.DataObject
) -> None:
    """Any expert choice (distinct experts per token, all of one peer's or spread) gets distinct slots, each in its
    destination's share of tokens x top_k slots."""
    per_peer = top_k  # the worst case: a peer holds every expert a token picks
    experts = [
        data.draw(st.lists(st.integers(0, peers * per_peer - 1), min_size=top_k, max_size=top_k, unique=True))
        for _ in range(tokens)
    ]
    flat = torch.tensor([e for chosen in experts for e in chosen], dtype=torch.int64)
    destinations = torch.sort(flat).values // per_peer
    capacity = tokens * min(top_k, per_peer)
    slots = slots_by_destination(destinations, peers, capacity)
    assert len(set(slots.tolist())) == len(slots), "no two rows share a slot"
    assert bool(((slots // max(capacity, 1)) == destinations).all()) if len(slots) else True
    assert bool((slots % max(capacity, 1) < capacity).all()) if len(slots) else True


def test_rows_come_back_in_the_order_they_were_sent() -> None:
    rows = torch.arange(12.0).view(6, 2)
    route = FixedRoute.by_destination(torch.tensor([2, 0, 2, 1, 0, 2]), peers=3, capacity=4)
    received = route.forward(rows, fill=-1.0)  # alone: what this instance would send itself
    assert received.view(3, 4, 2)[2, :3, 0].tolist() == [0.0, 4.0, 10.0], "rows keep their order per peer"
    assert received.view(3, 4, 2)[1, 1:, 0].tolist() == [-1.0, -1.0, -1.0], "untaken slots keep the fill"
    assert torch.equal(route.backward(received * 10), rows * 10)


def all_tokens_to_the_first_experts(engine: Engine) -> None:
    """Run in each rank (run_group's setup hook): every layer's router picks experts 0..k-1 for every token, all
    held by rank 0, with the gate's weights as usual: the worst load one instance can get."""
    for layer in engine.runner.model.modules():
        if isinstance(layer, SparseMoE):
            gate_route = layer.route

            def route(x: torch.Tensor, gate_route: Callable[..., Routed] = gate_route) -> Routed:
                weights, experts = gate_route(x)
                return weights, torch.arange(experts.shape[1], device=x.device).expand_as(experts).contiguous()

            layer.route = route  # type: ignore[method-assign]


def test_adversarial_expert_routing_never_overflows_and_equals_one_instance() -> None:
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    requests = [OfflineRequest(f"r{i}", list(range(1 + i, 30 + 7 * i)), params) for i in range(4)]
    results = run_group("tiny", CONFIG, [requests[:3], requests[3:]], setup=all_tokens_to_the_first_experts)
    lone = Engine.from_spec("tiny", CONFIG)
    all_tokens_to_the_first_experts(lone)
    tokens = run_alone(lone, requests)
    assert {**results[0].tokens, **results[1].tokens} == tokens
    assert all(len(t) == 10 for t in tokens.values())
