"""No request can take a decode group down: a table of poison requests, through the router's public API and straight
to a worker's internal one, each sent while a bystander request streams on the same group.

Every poison gets its status (refused at once with a message, or served when its settings are valid extremes), the
bystander finishes with the tokens it has when alone, and the group of two `nanocp worker` processes stays up and
READY. One group and router serve the whole table.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
import pytest_asyncio
from conftest import HEARTBEAT_S, HOST, ProcessGroup, all_ready, wait_until
from grpc import StatusCode as Code

from nanocp.client import AsyncClient, Chunk
from nanocp.harness.offline_group import free_port
from nanocp.internal.v1 import worker_pb2, worker_pb2_grpc
from nanocp.router.server import RouterServer, serve_router
from nanocp.v1 import common_pb2, router_pb2, router_pb2_grpc

pytestmark = pytest.mark.asyncio(loop_scope="module")

BYSTANDER_PROMPT = [5, 6, 7]
BYSTANDER_TOKENS = 16
HUGE_QUOTA = 10**6  # pages: far beyond any pool


@dataclass
class Setup:
    group: ProcessGroup
    router: RouterServer
    client: AsyncClient
    public: router_pb2_grpc.RouterServiceAsyncStub
    workers: dict[str, worker_pb2_grpc.WorkerServiceAsyncStub]  # by instance id: w0 is rank 0
    channels: list[grpc.aio.Channel]
    alone: list[int]  # the bystander's tokens when it runs alone


async def bystander_tokens(client: AsyncClient, request_id: str) -> AsyncIterator[Chunk]:
    async for chunk in client.generate(
        BYSTANDER_PROMPT, max_tokens=BYSTANDER_TOKENS, temperature=0.0, ignore_eos=True, request_id=request_id
    ):
        yield chunk


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def setup() -> AsyncIterator[Setup]:
    group = ProcessGroup.start([free_port(), free_port()])
    router = await serve_router("tiny", [f"{HOST}:{p}" for p in group.ports], HOST, 0, heartbeat_s=HEARTBEAT_S)
    client = AsyncClient(f"{HOST}:{router.port}", max_retries=0)
    channels = [grpc.aio.insecure_channel(f"{HOST}:{port}") for port in [router.port, *group.ports]]
    try:
        await wait_until(lambda: all_ready(client, True), "the group to be ready", timeout=90)
        alone = [t async for chunk in bystander_tokens(client, "alone") for t in chunk.token_ids]
        yield Setup(
            group,
            router,
            client,
            router_pb2_grpc.RouterServiceStub(channels[0]),  # type: ignore[arg-type]
            {f"w{rank}": worker_pb2_grpc.WorkerServiceStub(c) for rank, c in enumerate(channels[1:])},  # type: ignore[misc]
            channels,
            alone,
        )
    finally:
        for channel in channels:
            await channel.close()
        await client.close()
        await router.stop()
        group.kill()


@dataclass(frozen=True)
class Target:
    """What a poison may aim at: the live bystander and the worker that is its home."""

    request_id: str
    home: worker_pb2_grpc.WorkerServiceAsyncStub
    home_rank: int
    channel: grpc.aio.Channel  # to the home


Poison = Callable[[Setup, Target], Awaitable[Any]]


async def status_of(call: Awaitable[Any] | AsyncIterator[Any]) -> tuple[Code, str]:
    """The status a unary call or a whole stream ends with, and its message."""
    try:
        if isinstance(call, grpc.aio.UnaryStreamCall):
            async for _ in call:
                pass
        else:
            await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as exc:
        return exc.code(), str(exc.details())
    return Code.OK, ""


def generate(**sampling: Any) -> Poison:
    token_ids = sampling.pop("token_ids", [1, 2, 3])
    sampling.setdefault("max_tokens", 8)
    request = router_pb2.GenerateRequest(token_ids=token_ids, sampling=common_pb2.SamplingParams(**sampling))
    return lambda s, _: status_of(s.public.Generate(request))


def submit_request(
    request_id: str, prompt: list[int], placed: list[tuple[int, int, int]], **sampling: Any
) -> worker_pb2.SubmitRequest:
    sampling.setdefault("max_tokens", 8)
    return worker_pb2.SubmitRequest(
        request_id=request_id,
        prompt_token_ids=prompt,
        sampling=common_pb2.SamplingParams(**sampling),
        placement=common_pb2.Placement(shards=[common_pb2.Shard(rank=r, start=s, page_quota=q) for r, s, q in placed]),
    )


def submit(request_id: str = "poison", prompt: list[int] | None = None, shards: Any = None, **sampling: Any) -> Poison:
    """A Submit straight to the bystander's home; `shards(home_rank)` gives the placement (default: all there)."""

    def send(_: Setup, target: Target) -> Awaitable[tuple[Code, str]]:
        placed = shards(target.home_rank) if shards else [(target.home_rank, 0, 4)]
        request_id_sent = target.request_id if request_id == "<bystander>" else request_id
        return status_of(target.home.Submit(submit_request(request_id_sent, prompt or [1, 2, 3], placed, **sampling)))

    return send


async def over_commit_the_peer(_: Setup, target: Target) -> tuple[Code, str]:
    """Two Submits whose shards on the peer fit its 512 pages alone, not together (a placement no router makes): the
    peer refuses the second one's shard, and that request ends alone."""
    peer = 1 - target.home_rank
    held = target.home.Submit(submit_request("held", [1, 2, 3], [(peer, 0, 300)], max_tokens=64, ignore_eos=True))
    await held.read()  # its first token: the peer holds its 300 pages
    try:
        return await status_of(target.home.Submit(submit_request("over", [1, 2, 3], [(peer, 0, 300)])))
    finally:
        held.cancel()


def extend(shards: Callable[[int], list[tuple[int, int, int]]], request_id: str = "<bystander>") -> Poison:
    def send(_: Setup, target: Target) -> Awaitable[tuple[Code, str]]:
        request = worker_pb2.ExtendRequest(
            request_id=target.request_id if request_id == "<bystander>" else request_id,
            placement=common_pb2.Placement(
                shards=[common_pb2.Shard(rank=r, start=s, page_quota=q) for r, s, q in shards(target.home_rank)]
            ),
        )
        return status_of(target.home.Extend(request))

    return send


def raw(method: str, payload: bytes, to_router: bool = False) -> Poison:
    """Bytes that are no valid request message, sent as one (no serializer: they go as they are)."""

    def send(s: Setup, target: Target) -> Awaitable[tuple[Code, str]]:
        channel = s.channels[0] if to_router else target.channel
        if method.endswith(("Generate", "Submit")):
            return status_of(channel.unary_stream(method)(payload))
        return status_of(channel.unary_unary(method)(payload))

    return send


TRUNCATED_SUBMIT = worker_pb2.SubmitRequest(
    request_id="cut",
    prompt_token_ids=[1, 2, 3],
    placement=common_pb2.Placement(shards=[common_pb2.Shard(page_quota=4)]),
).SerializeToString()[:-1]
GARBAGE = b"\xff\xff\xff\xff"

POISONS: list[Any] = [
    # Public API: sampling values the sampler cannot take are refused; the extremes it can take are served.
    pytest.param(generate(temperature=1e-40), Code.INVALID_ARGUMENT, "temperature", id="subnormal_temperature"),
    pytest.param(generate(temperature=float("nan")), Code.INVALID_ARGUMENT, "temperature", id="nan_temperature"),
    pytest.param(generate(temperature=float("inf")), Code.INVALID_ARGUMENT, "temperature", id="inf_temperature"),
    pytest.param(generate(top_p=float("nan")), Code.INVALID_ARGUMENT, "top_p", id="nan_top_p"),
    pytest.param(generate(max_tokens=2**31 - 1), Code.INVALID_ARGUMENT, "max_tokens", id="huge_max_tokens"),
    pytest.param(generate(token_ids=[1, 384]), Code.INVALID_ARGUMENT, "token_ids[1]", id="token_past_vocab"),
    pytest.param(generate(token_ids=[-(2**31)]), Code.INVALID_ARGUMENT, "token_ids[0]", id="most_negative_token"),
    pytest.param(generate(temperature=0.01, seed=2**64 - 1), Code.OK, "", id="coldest_temperature_largest_seed"),
    pytest.param(generate(temperature=100.0), Code.OK, "", id="hottest_temperature"),
    pytest.param(generate(temperature=1.0, top_p=1e-45), Code.OK, "", id="smallest_top_p"),
    pytest.param(generate(temperature=1.0, top_k=2**31 - 1), Code.OK, "", id="largest_top_k"),
    pytest.param(generate(stop_token_ids=list(range(384))), Code.OK, "", id="every_token_stops"),
    pytest.param(
        raw("/nanocp.v1.RouterService/Generate", GARBAGE, True),
        Code.INVALID_ARGUMENT,
        "malformed",
        id="garbage_generate",
    ),
    # Internal API: the same checks, and what a placement may ask of the group.
    pytest.param(submit(temperature=1e-40), Code.INVALID_ARGUMENT, "temperature", id="submit_subnormal_temperature"),
    pytest.param(submit(prompt=[9999]), Code.INVALID_ARGUMENT, "token_ids[0] = 9999", id="submit_token_past_vocab"),
    pytest.param(submit(request_id=""), Code.INVALID_ARGUMENT, "request_id is empty", id="submit_empty_id"),
    pytest.param(submit(request_id="x" * 5000), Code.INVALID_ARGUMENT, "request_id has 5000", id="submit_huge_id"),
    pytest.param(submit(request_id="<bystander>"), Code.ALREADY_EXISTS, "already running", id="submit_duplicate_id"),
    pytest.param(
        submit(shards=lambda r: [(7, 0, 4)]), Code.INVALID_ARGUMENT, "outside the group", id="submit_rank_outside"
    ),
    pytest.param(
        submit(shards=lambda r: [(r, 0, 1), (r, 16, 4)]), Code.INVALID_ARGUMENT, "distinct", id="submit_same_rank_twice"
    ),
    pytest.param(
        submit(shards=lambda r: [(r, 0, -3)]), Code.INVALID_ARGUMENT, "quota of -3", id="submit_negative_quota"
    ),
    pytest.param(
        submit(shards=lambda r: [(r, 5, 4)]), Code.INVALID_ARGUMENT, "start at position 0", id="submit_bad_start"
    ),
    pytest.param(
        submit(shards=lambda r: [(r, 0, HUGE_QUOTA)]),
        Code.RESOURCE_EXHAUSTED,
        "1000000 KV pages",
        id="submit_huge_quota",
    ),
    pytest.param(submit(shards=lambda r: [(1 - r, 0, 4)]), Code.OK, "", id="submit_kv_all_on_the_peer"),
    pytest.param(submit(shards=lambda r: [(r, 0, 1), (1 - r, 16, 4)]), Code.OK, "", id="submit_kv_over_both"),
    pytest.param(
        over_commit_the_peer, Code.RESOURCE_EXHAUSTED, "cannot commit the 300 KV pages", id="submit_over_commits_peer"
    ),
    pytest.param(
        extend(lambda r: [(r, 0, HUGE_QUOTA)]), Code.RESOURCE_EXHAUSTED, "1000000 KV pages", id="extend_huge_quota"
    ),
    pytest.param(
        extend(lambda r: [(r, 0, 4), (9, 64, 4)]), Code.INVALID_ARGUMENT, "outside the group", id="extend_rank_outside"
    ),
    pytest.param(extend(lambda r: [(r, 0, 0)]), Code.INVALID_ARGUMENT, "quota of 0", id="extend_zero_quota"),
    pytest.param(
        extend(lambda r: [(r, 0, 4)], request_id=""), Code.INVALID_ARGUMENT, "request_id is empty", id="extend_empty_id"
    ),
    pytest.param(
        extend(lambda r: [(r, 0, 4)], request_id="nobody"), Code.NOT_FOUND, "no request 'nobody'", id="extend_unknown"
    ),
    pytest.param(
        lambda _, t: status_of(t.home.GetSteps(worker_pb2.GetStepsRequest(limit=-1))),
        Code.INVALID_ARGUMENT,
        "limit (-1)",
        id="negative_step_limit",
    ),
    pytest.param(
        lambda _, t: status_of(t.home.Abort(worker_pb2.AbortRequest())),
        Code.INVALID_ARGUMENT,
        "request_id is empty",
        id="abort_empty_id",
    ),
    pytest.param(
        raw("/nanocp.internal.v1.WorkerService/Submit", TRUNCATED_SUBMIT),
        Code.INVALID_ARGUMENT,
        "malformed",
        id="truncated_submit",
    ),
    pytest.param(
        raw("/nanocp.internal.v1.WorkerService/Extend", GARBAGE),
        Code.INVALID_ARGUMENT,
        "malformed",
        id="garbage_extend",
    ),
]


@pytest.mark.parametrize(("poison", "code", "message"), POISONS)
async def test_a_poison_request_gets_its_status_while_the_group_serves_on(
    setup: Setup, poison: Poison, code: Code, message: str, request: pytest.FixtureRequest
) -> None:
    bystander_id = f"bystander-{request.node.callspec.id}"
    stream = bystander_tokens(setup.client, bystander_id)
    first = await anext(stream)
    assert first.placement is not None, "the first chunk names the placement"
    home = first.placement.home
    rank = int(home.removeprefix("w"))
    target = Target(bystander_id, setup.workers[home], rank, setup.channels[1 + rank])

    got, details = await poison(setup, target)

    assert (got, message in details) == (code, True), details
    rest = [t async for chunk in stream for t in chunk.token_ids]
    assert list(first.token_ids) + rest == setup.alone, "the bystander streams on, with the tokens it has alone"
    assert all(p.poll() is None for p in setup.group.processes), "both workers of the group still run"
    assert await all_ready(setup.client, True)


async def test_after_the_table_every_page_is_back_and_the_group_serves(setup: Setup) -> None:
    async def free() -> bool:
        statuses = (await setup.client.list_instances()).instances
        return all(s.kv_pages_in_use == 0 and s.kv_pages_committed == 0 for s in statuses)

    await wait_until(free, "every KV page to be freed")
    tokens = [t async for chunk in bystander_tokens(setup.client, "after") for t in chunk.token_ids]
    assert tokens == setup.alone
