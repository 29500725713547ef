"""The router's Generate/Abort/ListInstances end to end on real tiny workers: streaming, cancellation, deadlines,
worker failure and recovery, and the per-instance accounting."""

from __future__ import annotations

import logging
from pathlib import Path

import grpc
import pytest
from conftest import HOST, Cluster, StartCluster, wait_until, write_model_config
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from nanocp.client import AsyncClient, DeadlineExceeded, NotFound, Unavailable
from nanocp.router.server import serve_router
from nanocp.tokenizer import ByteTokenizer
from nanocp.v1 import router_pb2
from nanocp.worker.engine import Engine
from nanocp.worker.request import RequestOutput, SamplingParams
from nanocp.worker.server import serve_worker

LONG = {"max_tokens": 900, "ignore_eos": True}  # seconds of decoding on the tiny model; tests cancel it early


async def test_generate_streams_placement_first_then_text_and_finish_with_usage_last(cluster: Cluster) -> None:
    chunks = [c async for c in cluster.client.generate("Hello", max_tokens=12, ignore_eos=True, seed=1)]
    assert chunks[0].placement is not None and chunks[0].placement.home == "w0"
    assert chunks[0].placement.shards[0].page_quota == 1  # 5 + 12 - 1 = 16 tokens: one page
    assert all(c.placement is None for c in chunks[1:])
    assert all(c.finish_reason is None and c.usage is None for c in chunks[:-1])
    ids = [t for c in chunks for t in c.token_ids]
    assert len(ids) == 12
    assert chunks[-1].finish_reason == "length"
    assert chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (5, 12)
    text, full = "".join(c.text for c in chunks), ByteTokenizer().decode(ids)
    assert text == full or (full.endswith("\ufffd") and full.startswith(text))  # an unfinished character is held
    assert len({c.request_id for c in chunks}) == 1


async def test_greedy_tokens_through_the_router_equal_the_engine_run_directly(cluster: Cluster) -> None:
    prompt = [5, 17, 42, 99, 200]
    chunks = [c async for c in cluster.client.generate(prompt, max_tokens=20, temperature=0, ignore_eos=True)]
    engine = Engine.from_spec("tiny", cluster.worker_config)
    tokens: list[int] = []

    def collect(output: RequestOutput) -> None:
        tokens.extend(output.new_token_ids)

    engine.add_request("direct", prompt, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), collect)
    while engine.has_work():
        engine.step()
    assert [t for c in chunks for t in c.token_ids] == tokens


async def test_abort_of_an_unknown_request_is_not_found(cluster: Cluster) -> None:
    with pytest.raises(NotFound, match="no live request with request_id 'nope'"):
        await cluster.client.abort("nope")


async def test_abort_ends_the_stream_cleanly_with_abort_and_frees_its_pages(cluster: Cluster) -> None:
    stream = cluster.client.generate([1, 2, 3], request_id="r1", **LONG)  # type: ignore[arg-type]
    first = await anext(stream)
    await cluster.client.abort("r1")
    rest = [c async for c in stream]
    assert rest[-1].finish_reason == "abort"
    assert rest[-1].usage is not None
    assert rest[-1].usage.completion_tokens == len(first.token_ids) + sum(len(c.token_ids) for c in rest)
    await cluster.wait_all_pages_free()


async def test_cancelled_stream_frees_its_pages_while_a_concurrent_stream_finishes(cluster: Cluster) -> None:
    cancelled = cluster.client.generate([1, 2, 3], **LONG)  # type: ignore[arg-type]
    await anext(cancelled)
    survivor = cluster.client.generate([4, 5, 6], max_tokens=30, ignore_eos=True)
    first = await anext(survivor)
    assert (await cluster.instances())["w0"].home_batch == 2
    cancelled.cancel()
    rest = [c async for c in survivor]
    assert rest[-1].finish_reason == "length"
    assert len(first.token_ids) + sum(len(c.token_ids) for c in rest) == 30
    await cluster.wait_all_pages_free()


async def test_deadline_passing_mid_stream_is_deadline_exceeded_and_frees_its_pages(cluster: Cluster) -> None:
    received = 0
    with pytest.raises(DeadlineExceeded):
        # 1 s: the first tokens arrive however busy the machine is; 900 take seconds (4 on a 2-core machine).
        async for chunk in cluster.client.generate([1, 2, 3], timeout=1.0, **LONG):  # type: ignore[arg-type]
            received += len(chunk.token_ids)
    assert 0 < received < 900
    await cluster.wait_all_pages_free()


async def test_list_instances_shows_each_instance_home_batch_committed_and_used_pages(
    start_cluster: StartCluster,
) -> None:
    cluster = await start_cluster(workers=2)
    a = cluster.client.generate(list(range(10)), **LONG)  # type: ignore[arg-type]
    b = cluster.client.generate(list(range(20)), **LONG)  # type: ignore[arg-type]
    homes = {(await anext(a)).placement.home, (await anext(b)).placement.home}  # type: ignore[union-attr]
    assert homes == {"w0", "w1"}, "the second request goes to the instance with no home requests"
    listing = await cluster.client.list_instances()
    statuses = {s.id: s for s in listing.instances}
    assert {s.home_batch for s in statuses.values()} == {1}
    committed = sorted(s.kv_pages_committed for s in statuses.values())
    assert committed == [57, 58]  # ceil((10 + 900 - 1) / 16), ceil((20 + 900 - 1) / 16)
    assert all(0 < s.kv_pages_in_use <= s.kv_pages_committed and s.kv_pages_total == 64 for s in statuses.values())
    assert all(s.state == router_pb2.INSTANCE_STATE_READY and s.page_size == 16 for s in statuses.values())
    assert sorted(r.prompt_tokens for r in listing.requests) == [10, 20]
    assert {r.placement.home for r in listing.requests} == {"w0", "w1"}
    a.cancel()
    b.cancel()
    await cluster.wait_all_pages_free()


async def test_without_migration_a_worker_killed_mid_stream_is_unavailable_naming_it_and_is_marked_unavailable(
    start_cluster: StartCluster,
) -> None:
    cluster = await start_cluster(workers=2, max_migrations=0)
    stream = cluster.client.generate([1, 2, 3], **LONG)  # type: ignore[arg-type]
    first = await anext(stream)
    assert first.placement is not None
    home = first.placement.home
    await cluster.kill_worker(home)
    with pytest.raises(Unavailable) as caught:
        async for _ in stream:
            pass
    assert f"instance {home}" in caught.value.message
    status = (await cluster.instances())[home]
    assert status.state == router_pb2.INSTANCE_STATE_UNAVAILABLE
    assert status.home_batch == 0 and status.kv_pages_committed == 0
    other = next(i for i in cluster.workers if i != home)
    chunks = [c async for c in cluster.client.generate([1, 2, 3], max_tokens=4)]
    assert chunks[0].placement is not None and chunks[0].placement.home == other


async def test_unavailable_worker_is_used_again_once_it_answers(cluster: Cluster) -> None:
    address, port = cluster.worker_address("w0"), cluster.workers["w0"].port
    await cluster.kill_worker("w0")

    async def state_is(state: router_pb2.InstanceState.ValueType) -> bool:
        return (await cluster.instances())["w0"].state == state

    await wait_until(lambda: state_is(router_pb2.INSTANCE_STATE_UNAVAILABLE), "the heartbeat to notice")
    with pytest.raises(Unavailable, match=r"no worker instance is ready \(w0 at "):
        async for _ in AsyncClient(cluster.address, max_retries=0).generate([1], max_tokens=2):
            pass
    restarted = await serve_worker("tiny", cluster.worker_config, HOST, port, "w0")
    cluster.workers["w0"] = restarted  # stopped with the cluster
    await wait_until(lambda: state_is(router_pb2.INSTANCE_STATE_READY), f"{address} to be ready again")
    chunks = [c async for c in cluster.client.generate([1], max_tokens=2)]
    assert chunks[-1].finish_reason in ("length", "stop")


async def test_worker_serving_another_model_is_never_placed_on(
    cluster: Cluster, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_model_config(tmp_path, max_position_embeddings=2048)
    with caplog.at_level(logging.WARNING, logger="nanocp.router.registry"):
        router = await serve_router(str(tmp_path), [cluster.worker_address("w0")], HOST, 0)
    try:
        assert "serves model 'tiny'" in caplog.text and f"router serves {tmp_path.name!r}" in caplog.text
        async with AsyncClient(f"{HOST}:{router.port}", max_retries=0) as client:
            (status,) = (await client.list_instances()).instances
            assert status.state == router_pb2.INSTANCE_STATE_UNAVAILABLE
            with pytest.raises(Unavailable, match="serves model 'tiny'"):
                async for _ in client.generate([1], max_tokens=2):
                    pass
    finally:
        await router.stop()


async def test_router_serves_health_and_reflection(cluster: Cluster) -> None:
    async with grpc.aio.insecure_channel(cluster.address) as channel:
        health = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="nanocp.v1.RouterService")
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        services = {s.name async for reply in replies for s in reply.list_services_response.service}
    assert {"nanocp.v1.RouterService", "grpc.health.v1.Health"} <= services
