"""DCP through the service: groups of 2 and 4 worker processes, a router per policy, the same mixed requests.

Greedy tokens are identical whatever the policy places; the dcp router spreads a long request's KV over both
instances and keeps short ones local, which ListInstances shows while they run; nothing is left behind.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator

import pytest
from conftest import HEARTBEAT_S, HOST, ProcessGroup, all_ready, wait_until

from nanocp.client import AsyncClient
from nanocp.harness.cp_streams import SPLIT_PAYS
from nanocp.harness.offline_group import free_port
from nanocp.router.policies import make_policy
from nanocp.router.server import serve_router

LONG_PROMPT = list(range(1, 256)) * 5  # 1275 tokens
SHORT_PROMPTS = [[7, 8, 9], list(range(40, 90))]
NEW = 24


@pytest.fixture(scope="module", params=[2, 4], ids=["2-instances", "4-instances"])
def group(request: pytest.FixtureRequest) -> Iterator[ProcessGroup]:
    processes = ProcessGroup.start([free_port() for _ in range(request.param)])
    yield processes
    processes.kill()


@contextlib.asynccontextmanager
async def router_with(
    policy: str, group: ProcessGroup, reserve: int | None = None, shard_tokens: int = 512
) -> AsyncIterator[AsyncClient]:
    router = await serve_router(
        "tiny",
        [f"{HOST}:{p}" for p in group.ports],
        HOST,
        0,
        make_policy(policy, cp_degree=2, shard_tokens=shard_tokens, max_degree=2, cost=SPLIT_PAYS),
        reserve_output_tokens=reserve,
        heartbeat_s=HEARTBEAT_S,
    )
    client = AsyncClient(f"{HOST}:{router.port}")
    try:
        await wait_until(lambda: all_ready(client, True), "the group to be ready", timeout=90)
        yield client
    finally:
        await client.close()
        await router.stop()


async def generate_all(client: AsyncClient) -> tuple[dict[str, list[int]], dict[str, int]]:
    """Streams every request at once; returns their tokens and the CP degree ListInstances showed for each."""
    streams = {
        name: client.generate(prompt, max_tokens=NEW, temperature=0.0, ignore_eos=True, request_id=name)
        for name, prompt in [("long", LONG_PROMPT), *((f"short{i}", p) for i, p in enumerate(SHORT_PROMPTS))]
    }
    tokens: dict[str, list[int]] = {name: [] for name in streams}
    first = {name: await anext(stream) for name, stream in streams.items()}  # all placed and running now
    degrees = {r.request_id: len(r.placement.shards) for r in (await client.list_instances()).requests}
    for name, stream in streams.items():
        tokens[name].extend(first[name].token_ids)
        async for chunk in stream:
            tokens[name].extend(chunk.token_ids)
    return tokens, degrees


async def test_policies_place_differently_and_generate_identical_tokens(group: ProcessGroup) -> None:
    results = {}
    for policy in ("static", "dcp", "uniform"):
        async with router_with(policy, group) as client:
            results[policy] = await generate_all(client)

            async def freed(c: AsyncClient = client) -> bool:
                instances = (await c.list_instances()).instances
                return all(i.kv_pages_in_use == 0 and i.kv_pages_committed == 0 for i in instances)

            await wait_until(freed, f"every shard freed on every instance after {policy}")
    tokens = {policy: t for policy, (t, _) in results.items()}
    assert tokens["dcp"] == tokens["static"] == tokens["uniform"]
    assert all(len(t) == NEW for t in tokens["static"].values())
    assert results["static"][1] == {"long": 1, "short0": 1, "short1": 1}
    assert results["dcp"][1] == {"long": 2, "short0": 1, "short1": 1}, "only the long request is split"
    assert results["uniform"][1] == {"long": 2, "short0": 2, "short1": 2}


async def all_freed(client: AsyncClient) -> bool:
    instances = (await client.list_instances()).instances
    return all(i.kv_pages_in_use == 0 and i.kv_pages_committed == 0 for i in instances)


@pytest.mark.parametrize("policy", ["static", "dcp"])
async def test_placements_grow_mid_decode_without_changing_tokens(group: ProcessGroup, policy: str) -> None:
    new = 72  # against a reserve of 16 new tokens: the placement must grow several times while decoding
    prompt = list(range(3, 60))
    async with router_with("static", group) as client:
        expected = [t async for c in client.generate(prompt, max_tokens=new, temperature=0.0) for t in c.token_ids]
    # dcp cuts no shard under 80 tokens: the first placement (57 + 16 tokens) stays on one instance, its growth not.
    async with router_with(policy, group, reserve=16, shard_tokens=80) as client:
        placements, tokens = [], []
        async for chunk in client.generate(prompt, max_tokens=new, temperature=0.0):
            tokens.extend(chunk.token_ids)
            if chunk.placement is not None:
                placements.append(chunk.placement)
        await wait_until(lambda: all_freed(client), "every grown shard freed")
    assert tokens == expected
    assert len(placements) > 1, "the placement grew mid-decode"
    first, last = placements[0], placements[-1]
    quota = sum(s.page_quota for s in last.shards)
    assert quota > sum(s.page_quota for s in first.shards) and quota * 16 >= len(prompt) + new - 1
    assert [s.start for s in last.shards[: len(first.shards)]] == [s.start for s in first.shards], "no KV moved"
    if policy == "dcp":
        assert last.cp_degree == 2 > first.cp_degree, "dcp grows by a shard on another instance"
    else:
        assert last.cp_degree == first.cp_degree == 1


async def test_a_cancelled_cp_request_frees_its_shards_on_every_holder(group: ProcessGroup) -> None:
    async with router_with("dcp", group) as client:
        # 1275 + 200 tokens in two even shards: the prompt alone spans both.
        stream = client.generate(LONG_PROMPT, max_tokens=200, temperature=0.0, ignore_eos=True)
        first = await anext(stream)
        assert first.placement is not None and first.placement.cp_degree == 2
        await anext(stream)
        held = {i.id: i.kv_pages_in_use for i in (await client.list_instances()).instances}
        assert all(held[s.instance] > 0 for s in first.placement.shards), "both holders hold KV"
        stream.cancel()
        await wait_until(lambda: all_freed(client), "the cancelled request's shards freed on every holder")
