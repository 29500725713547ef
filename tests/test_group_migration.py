"""Two decode groups of 2 worker processes behind one router: when a member of one group is killed or stalls past the
collective timeout mid-decode, every stream goes on at the other group with the tokens of an undisturbed run, and
the restarted group is used again; a stall the group survives ends nothing (nanocp.router.migration, registry).

The workers are real processes (`nanocp worker`), started once for the module; the router runs in each test.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from conftest import HEARTBEAT_S, HOST, ProcessGroup, all_ready, wait_until

from nanocp.client import AsyncClient, Chunk
from nanocp.harness.offline_group import free_port
from nanocp.router.cost import CostModel
from nanocp.router.policies import make_policy
from nanocp.router.server import serve_router
from nanocp.v1 import router_pb2

COLLECTIVE_TIMEOUT_S = 8.0  # longer than the 3 s stall that must end nothing; the stalled group fails after it
NEW = 40
LONG = list(range(1, 250))  # 249 tokens: two shards of the dcp policy below, one on each member of its group
# dcp splits only where its cost model predicts a faster group step: this one prices KV reads alone, so it does.
SPLIT_PAYS = CostModel(kv_token_ms=1.0, home_token_ms=0.0, routed_row_ms=0.0, fixed_ms=0.0, cp_step_ms=0.0)
# Greedy and seeded, short and long (CP degree 2).
REQUESTS: dict[str, dict[str, Any]] = {
    **{f"greedy-{i}": {"prompt": [1 + i, 2, 3], "temperature": 0.0} for i in range(2)},
    **{f"greedy-long-{i}": {"prompt": [7 + i, *LONG], "temperature": 0.0} for i in range(2)},
    **{f"seeded-{i}": {"prompt": [5, 6 + i], "temperature": 0.9, "top_k": 40, "seed": 10 + i} for i in range(2)},
    **{f"seeded-long-{i}": {"prompt": [9 + i, *LONG], "temperature": 1.0, "seed": 20 + i} for i in range(2)},
}


@dataclass
class Groups:
    """Groups a (instances a0, a1) and b (b0, b1), by name."""

    groups: dict[str, ProcessGroup]

    @classmethod
    def start(cls) -> Groups:
        return cls({name: cls.start_group(name, [free_port(), free_port()]) for name in "ab"})

    @staticmethod
    def start_group(name: str, ports: list[int]) -> ProcessGroup:
        return ProcessGroup.start(ports, lambda rank: ["--instance-id", f"{name}{rank}"], COLLECTIVE_TIMEOUT_S)

    @property
    def addresses(self) -> list[str]:
        return [f"{HOST}:{port}" for group in self.groups.values() for port in group.ports]

    def process(self, instance_id: str) -> subprocess.Popen[bytes]:
        return self.groups[instance_id[0]].processes[int(instance_id[1:])]

    def restart(self, name: str) -> None:
        group = self.groups[name]
        for process in group.processes:
            if process.poll() is None:
                os.kill(process.pid, signal.SIGCONT)  # a stalled member must be able to die
        group.kill()
        self.groups[name] = self.start_group(name, group.ports)

    def kill(self) -> None:
        for group in self.groups.values():
            group.kill()


@pytest.fixture(scope="module")
def groups() -> Iterator[Groups]:
    started = Groups.start()
    yield started
    started.kill()


@pytest.fixture
async def client(groups: Groups) -> AsyncIterator[AsyncClient]:
    for name, group in groups.groups.items():
        if any(p.poll() is not None for p in group.processes):  # a test before failed it
            groups.restart(name)
    policy = make_policy("dcp", shard_tokens=128, max_degree=2, cost=SPLIT_PAYS)
    router = await serve_router("tiny", groups.addresses, HOST, 0, policy, heartbeat_s=HEARTBEAT_S)
    client = AsyncClient(f"{HOST}:{router.port}", max_retries=0)
    try:
        await wait_until(lambda: all_ready(client, True), "both groups to be ready", timeout=120)
        yield client
    finally:
        await client.close()
        await router.stop()


@dataclass
class Stream:
    chunks: list[Chunk] = field(default_factory=list)
    arrived: list[float] = field(default_factory=list)  # time.monotonic() of each chunk

    @property
    def tokens(self) -> list[int]:
        return [t for c in self.chunks for t in c.token_ids]

    @property
    def homes(self) -> list[str]:
        return [c.placement.home for c in self.chunks if c.placement is not None]

    def holder_not_home(self) -> str:
        """The instance that holds a shard of a CP request's KV but is not its home."""
        placement = self.chunks[0].placement
        assert placement is not None and len(placement.shards) == 2, "a long request is placed at CP degree 2"
        return next(s.instance for s in placement.shards if s.instance != placement.home)


async def generate(
    client: AsyncClient, disturb: Callable[[dict[str, Stream]], Awaitable[None]] | None = None
) -> dict[str, Stream]:
    """Streams every request at once; `disturb(streams)` is awaited once every stream has its first token."""
    streams = {name: Stream() for name in REQUESTS}
    started = {name: asyncio.Event() for name in REQUESTS}

    async def one(name: str) -> None:
        kwargs = dict(REQUESTS[name])
        async for chunk in client.generate(kwargs.pop("prompt"), max_tokens=NEW, ignore_eos=True, **kwargs):
            streams[name].chunks.append(chunk)
            streams[name].arrived.append(time.monotonic())
            started[name].set()

    tasks = [asyncio.create_task(one(name)) for name in REQUESTS]
    if disturb is not None:
        await asyncio.gather(*(e.wait() for e in started.values()))
        await disturb(streams)
    await asyncio.gather(*tasks)
    return streams


def assert_undisturbed(streams: dict[str, Stream], undisturbed: dict[str, Stream]) -> None:
    for name, stream in streams.items():
        assert stream.tokens == undisturbed[name].tokens, f"{name}: a token was lost, repeated or changed"
        usage = stream.chunks[-1].usage
        assert stream.chunks[-1].finish_reason == "length" and usage is not None
        assert (usage.prompt_tokens, usage.completion_tokens) == (len(REQUESTS[name]["prompt"]), NEW)


async def group_idle(client: AsyncClient, group: str) -> bool:
    members = [i for i in (await client.list_instances()).instances if i.id.startswith(group)]
    return all(i.kv_pages_in_use == 0 and i.kv_pages_committed == 0 and i.home_batch == 0 for i in members)


@pytest.mark.parametrize("how", ["killed", "stalled"])
async def test_every_stream_survives_a_lost_member_and_the_restarted_group_serves_again(
    groups: Groups, client: AsyncClient, how: str
) -> None:
    undisturbed = await generate(client)
    victim = ""

    async def lose_a_holder(streams: dict[str, Stream]) -> None:
        nonlocal victim  # a long request's shard holder, not its home: its home's stream fails through the group
        victim = streams["greedy-long-0"].holder_not_home()
        groups.process(victim).send_signal(signal.SIGKILL if how == "killed" else signal.SIGSTOP)

    streams = await generate(client, lose_a_holder)
    assert_undisturbed(streams, undisturbed)
    failed, survivor = victim[0], "b" if victim[0] == "a" else "a"
    moved = [name for name, s in streams.items() if s.homes[0].startswith(failed)]
    assert "greedy-long-0" in moved
    for name in moved:
        assert len(streams[name].homes) == 2 and streams[name].homes[1].startswith(survivor), f"{name} moved"
    assert (await client.list_instances()).migrations_total == len(moved)
    await wait_until(lambda: group_idle(client, survivor), "every page of the surviving group to be released")

    groups.restart(failed)
    await wait_until(lambda: all_ready(client, True), "the restarted group to be picked up", timeout=120)
    await wait_until(lambda: group_idle(client, failed), "the failed group's held placements to be released")
    again = await generate(client)
    assert any(s.homes[0].startswith(failed) for s in again.values()), "the restarted group takes requests"


async def test_a_stall_shorter_than_the_collective_timeout_ends_no_stream(groups: Groups, client: AsyncClient) -> None:
    undisturbed = await generate(client)
    resumed, victim = 0.0, ""

    async def stall_a_holder(streams: dict[str, Stream]) -> None:
        nonlocal resumed, victim  # of the long requests, the last to start: its group is mid-decode
        victim = streams["greedy-long-0"].holder_not_home()
        groups.process(victim).send_signal(signal.SIGSTOP)
        await asyncio.sleep(3.0)
        groups.process(victim).send_signal(signal.SIGCONT)
        resumed = time.monotonic()

    streams = await generate(client, stall_a_holder)
    assert_undisturbed(streams, undisturbed)
    stalled = [s for s in streams.values() if s.homes[0].startswith(victim[0])]
    assert all(s.arrived[-1] > resumed for s in stalled), "the stalled group decoded on after the stall"
    assert all(len(s.homes) == 1 for s in streams.values()), "no stream moved"
    listing = await client.list_instances()
    assert listing.migrations_total == 0
    assert all(i.state == router_pb2.INSTANCE_STATE_READY for i in listing.instances)
    assert all(p.poll() is None for p in groups.groups[victim[0]].processes), "the group survived"
