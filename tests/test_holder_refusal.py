"""A placement that over-commits a remote holder (never the router's: its ledger commits every page it places, but a
crafted or stale Submit can) ends that request alone: the holder refuses the shard instead of failing the group's
step, the home ends the request RESOURCE_EXHAUSTED without a token, and the other requests of both instances get the
tokens they get alone. Two CPU processes over gloo; eagerly and read at once, and at graph buckets' static layout with
the tokens read a step late (the overlap scheduler, as on CUDA)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from nanocp.harness.offline_group import OfflineRequest, run_alone, run_group
from nanocp.placement import Shard
from nanocp.worker.engine import Engine, EngineConfig
from nanocp.worker.request import SamplingParams

CONFIG = EngineConfig(page_size=8, num_pages=16, max_step_tokens=32, max_running=8)


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


# Rank 1 commits 10 of its 16 pages to a request of its own when it admits it; rank 0 then asks it for 10 more.
HOME = OfflineRequest("home-alone", [5, 6, 7], greedy(12))
PEERS_OWN = OfflineRequest("peers-own", [9, 8, 7, 6], greedy(10), [Shard(1, 0, 10)])
OVER = OfflineRequest("over", [1, 2, 3, 4, 5], greedy(6), [Shard(1, 0, 10)])


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static-overlapped"])
def test_an_over_committing_placement_ends_alone_and_the_group_serves_on(static: bool) -> None:
    config = replace(CONFIG, static_decode=static, overlap=static)
    home, peer = run_group("tiny", config, [[HOME, OVER], [PEERS_OWN]], timeout_s=240)

    assert home.errors.keys() == {"over"}, home.errors
    assert home.errors["over"].startswith("RESOURCE_EXHAUSTED: rank 1 of the group cannot commit the 10 KV pages")
    assert home.tokens.get("over", []) == [], "no token computed without its shard reaches the client"
    assert peer.errors == {}
    alone = run_alone(Engine.from_spec("tiny", CONFIG), [HOME, replace(PEERS_OWN, shards=None)])
    assert (home.tokens[HOME.request_id], peer.tokens[PEERS_OWN.request_id]) == (
        alone[HOME.request_id],
        alone[PEERS_OWN.request_id],
    )
    assert (home.pages_in_use, home.pages_committed, peer.pages_in_use, peer.pages_committed) == (0, 0, 0, 0)
