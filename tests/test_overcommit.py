"""A holder refuses pages or quota beyond its pool with an error (never an assert), leaving its accounts as they were;
an Extend asking for more pages here than are uncommitted ends that request alone."""

from __future__ import annotations

import pytest

from nanocp.placement import Shard
from nanocp.worker.engine import Engine, EngineConfig
from nanocp.worker.kv_cache import OverCommit, PagePool, ShardStore
from nanocp.worker.request import FinishReason, RequestOutput, SamplingParams


def test_a_quota_beyond_the_pool_is_refused_and_leaves_nothing_behind() -> None:
    store = ShardStore(PagePool(8), page_size=4)
    store.open(key=1, index=0, quota=6)
    with pytest.raises(OverCommit, match="a quota of 3 pages exceeds the 2 uncommitted pages of this instance's 8"):
        store.open(key=2, index=0, quota=3)
    with pytest.raises(OverCommit, match="exceeds the 2 uncommitted"):
        store.open(key=1, index=0, quota=9)  # growing a held shard past the pool
    assert (len(store), store.pool.committed, store.quota(2, 0), store.quota(1, 0)) == (1, 6, 0, 6)


def test_pages_beyond_a_shards_quota_are_refused() -> None:
    store = ShardStore(PagePool(8), page_size=4)
    store.open(key=1, index=0, quota=2)
    assert len(store.pages_for(1, 0, tokens=8)) == 2
    with pytest.raises(OverCommit, match="outgrew its quota of 2 pages"):
        store.pages_for(1, 0, tokens=9)
    with pytest.raises(OverCommit, match="7 pages taken with only 6 free"):
        store.pool.take(7)


def test_an_extend_beyond_the_uncommitted_pages_ends_that_request_alone() -> None:
    engine = Engine.from_spec("tiny", EngineConfig(page_size=4, num_pages=16, max_step_tokens=32, max_running=8))
    finished: dict[str, RequestOutput] = {}

    def collect(out: RequestOutput) -> None:
        if out.finish_reason is not None:
            finished[out.request_id] = out

    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    engine.add_request("big", [1, 2, 3], params, collect)  # 42 positions: 11 pages committed here
    engine.add_request("small", [4, 5], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True), collect)
    engine.step()
    engine.extend("small", [Shard(0, 0, 15)])  # 13 more pages; 3 are uncommitted
    assert finished["small"].error_code == "RESOURCE_EXHAUSTED"
    assert finished["small"].error is not None and "13 more pages" in finished["small"].error
    while engine.has_work():
        engine.step()
    assert finished["big"].finish_reason == FinishReason.LENGTH and finished["big"].completion_tokens == 40
    assert engine.store.pool.committed == 0 and engine.store.pool.num_in_use == 0
