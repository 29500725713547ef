"""A request whose instance fails mid-stream goes on at another on the same client stream (nanocp.router.migration).

In-process lone workers here (each a decode group of one, stopped like a killed process: its streams fail); the
groups of worker processes, killed and stalled, are tests/test_group_migration.py.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from conftest import HEARTBEAT_S, HOST, wait_until
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from test_metrics import scrape
from test_top import rows_of, text_of

from nanocp.client import AsyncClient, Chunk, Unavailable
from nanocp.internal.v1 import worker_pb2, worker_pb2_grpc
from nanocp.router.server import RouterServer, serve_router
from nanocp.top import Top, placement_table
from nanocp.v1 import common_pb2, router_pb2
from nanocp.worker.engine import EngineConfig
from nanocp.worker.server import WorkerServer, serve_worker

CONFIG = EngineConfig(page_size=16, num_pages=64, max_step_tokens=64, max_running=8)
NEW = 100  # tokens a request: long enough to be mid-stream when its worker is stopped
# Greedy and seeded, short and long (the long one prefills in several chunks), stop tokens.
REQUESTS: dict[str, dict[str, Any]] = {
    "greedy": {"prompt": [1, 2, 3], "temperature": 0.0},
    "greedy-long": {"prompt": list(range(1, 200)), "temperature": 0.0},
    "seeded": {"prompt": [5, 6, 7, 8], "temperature": 0.9, "top_k": 50, "seed": 1234},
    "seeded-top-p": {"prompt": [9] * 20, "temperature": 1.2, "top_p": 0.9, "seed": 99},
}


@dataclass
class Pair:
    """Two lone workers and a router with metrics and tracing."""

    workers: dict[str, WorkerServer]
    ports: dict[str, int]
    router: RouterServer
    client: AsyncClient
    exporter: InMemorySpanExporter
    stopped: list[WorkerServer] = field(default_factory=list)

    async def stop_worker(self, instance_id: str) -> None:
        self.stopped.append(self.workers[instance_id])
        await self.workers[instance_id].stop()

    async def restart_worker(self, instance_id: str) -> None:
        self.workers[instance_id] = await serve_worker("tiny", CONFIG, HOST, self.ports[instance_id], instance_id)

    async def committed(self) -> dict[str, int]:
        return {i.id: i.kv_pages_committed for i in (await self.client.list_instances()).instances}


async def start_pair(workers: int = 2, max_migrations: int = 2) -> Pair:
    servers = {f"w{i}": await serve_worker("tiny", CONFIG, HOST, 0, f"w{i}") for i in range(workers)}
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    router = await serve_router(
        "tiny",
        [f"{HOST}:{w.port}" for w in servers.values()],
        HOST,
        0,
        metrics_port=0,
        heartbeat_s=HEARTBEAT_S,
        tracer_provider=provider,
        max_migrations=max_migrations,
    )
    client = AsyncClient(f"{HOST}:{router.port}", max_retries=0)
    return Pair(servers, {name: w.port for name, w in servers.items()}, router, client, exporter)


@pytest.fixture
async def pair() -> AsyncIterator[Pair]:
    started = await start_pair()
    yield started
    await stop(started)


async def stop(pair: Pair) -> None:
    await pair.client.close()
    await pair.router.stop()
    for worker in pair.workers.values():
        if worker not in pair.stopped:
            await worker.stop()


async def generate(
    client: AsyncClient, requests: dict[str, dict[str, Any]], stop_home_of: str | None = None, pair: Pair | None = None
) -> dict[str, list[Chunk]]:
    """Streams every request at once; with `stop_home_of`, stops that request's home once every stream has tokens."""
    chunks: dict[str, list[Chunk]] = {name: [] for name in requests}
    started = {name: asyncio.Event() for name in requests}

    async def one(name: str) -> None:
        kwargs = dict(requests[name])
        async for chunk in client.generate(kwargs.pop("prompt"), max_tokens=NEW, ignore_eos=True, **kwargs):
            chunks[name].append(chunk)
            if chunk.token_ids:
                started[name].set()

    tasks = [asyncio.create_task(one(name)) for name in requests]
    if stop_home_of is not None and pair is not None:
        await asyncio.gather(*(e.wait() for e in started.values()))
        first = chunks[stop_home_of][0].placement
        assert first is not None
        await pair.stop_worker(first.home)
    await asyncio.gather(*tasks)
    return chunks


def tokens(chunks: list[Chunk]) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


def homes(chunks: list[Chunk]) -> list[str]:
    """The homes a stream told its client, in order (placement on the first chunk and after every change)."""
    return [c.placement.home for c in chunks if c.placement is not None]


async def test_streams_of_a_stopped_worker_go_on_at_the_other_with_the_tokens_of_an_undisturbed_run(
    pair: Pair,
) -> None:
    undisturbed = await generate(pair.client, REQUESTS)
    disturbed = await generate(pair.client, REQUESTS, stop_home_of="greedy", pair=pair)

    lost = homes(disturbed["greedy"])[0]
    moved = [name for name, chunks in disturbed.items() if homes(chunks)[0] == lost]
    assert moved, "the stopped worker was the home of at least one stream"
    for name, chunks in disturbed.items():
        assert tokens(chunks) == tokens(undisturbed[name]), f"{name}: no token lost, repeated or changed"
        last = chunks[-1]
        assert last.finish_reason == "length" and last.usage is not None
        assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (len(REQUESTS[name]["prompt"]), NEW)
        if name in moved:
            assert len(homes(chunks)) == 2 and homes(chunks)[1] != lost, f"{name} was told where it went"

    listing = await pair.client.list_instances()
    assert listing.migrations_total == len(moved)
    samples = await asyncio.to_thread(scrape, pair.router.metrics_port)  # type: ignore[arg-type]
    assert samples['nanocp_request_migrations_total{reason="stream_failed"}'] == len(moved)
    assert samples['nanocp_request_migrations_total{reason="unresponsive"}'] == 0
    spans = [s for s in pair.exporter.get_finished_spans() if s.name == "text_completion tiny"]
    events = [e for s in spans for e in s.events if e.name == "request_migrated"]
    assert len(events) == len(moved)
    assert all(e.attributes is not None and e.attributes["nanocp.migration.from_home"] == lost for e in events)


async def test_a_stop_token_and_the_usage_count_hold_across_a_move(pair: Pair) -> None:
    (undisturbed,) = (await generate(pair.client, {"seeded": REQUESTS["seeded"]})).values()
    # A token the undisturbed run first draws well after the move: the moved request must stop exactly there.
    generated = tokens(undisturbed)
    at = next(i for i in range(20, NEW) if generated[i] not in generated[:i])
    request = {**REQUESTS["seeded"], "stop_token_ids": [generated[at]]}
    chunks = (await generate(pair.client, {"seeded": request}, stop_home_of="seeded", pair=pair))["seeded"]
    assert tokens(chunks) == generated[: at + 1]
    assert chunks[-1].finish_reason == "stop" and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == at + 1
    assert len(homes(chunks)) == 2


async def test_a_failed_instance_keeps_its_pages_committed_until_it_answers_again(pair: Pair) -> None:
    disturbed = await generate(pair.client, REQUESTS, stop_home_of="greedy", pair=pair)
    lost = homes(disturbed["greedy"])[0]
    other = next(i for i in pair.workers if i != lost)
    committed = await pair.committed()
    assert committed[other] == 0, "the survivor's pages are back"
    assert committed[lost] > 0, "what the lost instance held is not placed on until it answers again"
    await pair.restart_worker(lost)

    async def released() -> bool:
        return (await pair.committed())[lost] == 0

    await wait_until(released, "the restarted instance's pages to be released")


async def test_a_request_moves_at_most_max_migrations_times() -> None:
    pair = await start_pair(workers=3, max_migrations=1)
    try:
        stream = pair.client.generate([1, 2, 3], max_tokens=900, temperature=0.0, ignore_eos=True)
        first = await anext(stream)
        assert first.placement is not None
        await pair.stop_worker(first.placement.home)
        async for chunk in stream:
            if chunk.placement is not None:  # it moved: stop its new home too
                await pair.stop_worker(chunk.placement.home)
                break
        with pytest.raises(Unavailable, match=r"instance w\d at .* it moved 1 time\(s\) already"):
            async for _ in stream:
                pass
    finally:
        await stop(pair)


async def test_with_no_instance_left_the_stream_ends_unavailable_naming_the_lost_one(pair: Pair) -> None:
    stream = pair.client.generate([1, 2, 3], max_tokens=900, temperature=0.0, ignore_eos=True)
    first = await anext(stream)
    assert first.placement is not None
    await pair.stop_worker(next(i for i in pair.workers if i != first.placement.home))
    await wait_until(lambda: one_ready(pair.client), "the router to notice")
    await pair.stop_worker(first.placement.home)
    with pytest.raises(Unavailable, match=rf"instance {first.placement.home} at .* no healthy decode group is left"):
        async for _ in stream:
            pass


async def one_ready(client: AsyncClient) -> bool:
    return sum(not i.problem for i in (await client.list_instances()).instances) == 1


@pytest.mark.parametrize("tokens_generated", [-1, 3])
async def test_a_worker_refuses_a_resumption_whose_generated_tokens_are_not_in_its_prompt(
    tokens_generated: int,
) -> None:
    worker = await serve_worker("tiny", CONFIG, HOST, 0, "w0")
    try:
        async with grpc.aio.insecure_channel(f"{HOST}:{worker.port}") as channel:
            stub = worker_pb2_grpc.WorkerServiceStub(channel)
            submit = worker_pb2.SubmitRequest(
                request_id="r", prompt_token_ids=[1, 2, 3], tokens_generated=tokens_generated
            )
            submit.sampling.max_tokens = 4
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                async for _ in stub.Submit(submit):
                    pass
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "tokens_generated must be from 0 to the prompt's length - 1 (2)" in (refused.value.details() or "")
    finally:
        await worker.stop()


async def test_nanocp_top_shows_how_often_a_request_moved_and_from_where() -> None:
    request = router_pb2.LiveRequest(
        request_id="r", placement=common_pb2.Placement(home="w1"), migrations=1, migrated_from="w0"
    )
    rows = rows_of(text_of(placement_table(OrderedDict([("r", (request, True))]))))
    assert rows["r"][-1] == "live, moved 1x from w0"
    top = Top("127.0.0.1:1")
    try:
        top.listing = router_pb2.ListInstancesResponse(migrations_total=3)
        assert "3 moved after a group failed" in text_of(top.render())
    finally:
        await top.close()
