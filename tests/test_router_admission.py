"""Admission: a request that fits nowhere now waits (bounded queue; later requests that fit may go ahead, a bounded
number) until pages are released; one that can never fit is refused at once with the sizes in the message."""

from __future__ import annotations

import asyncio

import pytest
from conftest import Cluster, StartCluster, wait_until

from nanocp.client import Chunk, DeadlineExceeded, ResourceExhausted

# 64 pages of 16 tokens a worker: a request of 10 prompt + 990 new tokens takes 63 of them, leaving 1, and runs
# for seconds, far longer than these tests need it to.
PAGES = 64
BIG = {"max_tokens": 990, "ignore_eos": True}  # 999 tokens -> 63 pages
SMALL = {"max_tokens": 20, "ignore_eos": True}  # 29 tokens -> 2 pages
PROMPT = list(range(10))


async def collect(cluster: Cluster, **params: object) -> list[Chunk]:
    return [chunk async for chunk in cluster.client.generate(PROMPT, **params)]  # type: ignore[arg-type]


async def queued(cluster: Cluster) -> int:
    return (await cluster.client.list_instances()).queued


async def test_request_that_can_never_fit_is_refused_at_once_naming_its_size_and_the_capacity(
    start_cluster: StartCluster,
) -> None:
    cluster = await start_cluster(num_pages=PAGES)
    with pytest.raises(ResourceExhausted) as caught:
        await collect(cluster, max_tokens=1100)
    message = caught.value.message
    assert "1109 tokens" in message and "70 pages of 16 tokens" in message
    assert "largest instance holds 64 pages (1024 tokens)" in message
    assert await queued(cluster) == 0


async def test_request_waits_in_the_queue_for_memory_then_runs(start_cluster: StartCluster) -> None:
    cluster = await start_cluster(num_pages=PAGES)
    big = cluster.client.generate(PROMPT, **BIG)  # type: ignore[arg-type]
    await anext(big)
    small = asyncio.create_task(collect(cluster, **SMALL))
    await wait_until(lambda: queued_is(cluster, 1), "the small request to queue")
    assert not small.done(), "a request must not run while its pages are committed to another"
    big.cancel()
    chunks = await small
    assert chunks[-1].finish_reason == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 20
    assert chunks[0].placement is not None and chunks[0].placement.shards[0].page_quota == 2
    await cluster.wait_all_pages_free()


async def queued_is(cluster: Cluster, n: int) -> bool:
    return await queued(cluster) == n


async def test_full_queue_refuses_with_resource_exhausted(start_cluster: StartCluster) -> None:
    cluster = await start_cluster(num_pages=PAGES, queue_size=1)
    big = cluster.client.generate(PROMPT, **BIG)  # type: ignore[arg-type]
    await anext(big)
    waiting = asyncio.create_task(collect(cluster, **SMALL))
    await wait_until(lambda: queued_is(cluster, 1), "one request to queue")
    with pytest.raises(ResourceExhausted, match="admission queue is full"):
        await collect(cluster, **SMALL)
    big.cancel()
    assert (await waiting)[-1].finish_reason == "length"


async def test_a_later_request_that_fits_goes_ahead_of_a_queued_one_that_does_not(start_cluster: StartCluster) -> None:
    cluster = await start_cluster(num_pages=PAGES)
    big = cluster.client.generate(PROMPT, **BIG)  # type: ignore[arg-type]
    await anext(big)
    small = asyncio.create_task(collect(cluster, **SMALL))
    await wait_until(lambda: queued_is(cluster, 1), "the small request to queue")
    # One page is free, enough for this tiny request: it runs while the small one still waits for the big one.
    assert (await collect(cluster, max_tokens=2))[-1].finish_reason == "length"
    assert await queued(cluster) == 1 and not small.done()
    big.cancel()
    assert (await small)[-1].finish_reason == "length"


async def test_abort_of_a_queued_request_ends_its_stream_with_abort_and_leaves_the_queue(
    start_cluster: StartCluster,
) -> None:
    cluster = await start_cluster(num_pages=PAGES)
    big = cluster.client.generate(PROMPT, **BIG)  # type: ignore[arg-type]
    await anext(big)
    waiting = cluster.client.generate(PROMPT, request_id="waiting", **SMALL)  # type: ignore[arg-type]
    chunks = asyncio.create_task(anext(waiting))
    await wait_until(lambda: queued_is(cluster, 1), "the request to queue")
    await cluster.client.abort("waiting")
    last = await chunks
    assert (last.finish_reason, last.placement, last.token_ids) == ("abort", None, [])
    assert await queued(cluster) == 0
    big.cancel()
    await cluster.wait_all_pages_free()


async def test_queued_request_past_its_deadline_leaves_the_queue(start_cluster: StartCluster) -> None:
    cluster = await start_cluster(num_pages=PAGES)
    big = cluster.client.generate(PROMPT, **BIG)  # type: ignore[arg-type]
    await anext(big)
    with pytest.raises(DeadlineExceeded):
        await collect(cluster, timeout=0.3, **SMALL)
    await wait_until(lambda: queued_is(cluster, 0), "the queue to empty")
    big.cancel()
    await cluster.wait_all_pages_free()
