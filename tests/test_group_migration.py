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
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import pytest
from conftest import HEARTBEAT_S, HOST, ProcessGroup, all_ready, wait_until

from nanocp.client import AsyncClient
from nanocp.harness.cp_streams import REQUESTS, SPLIT_PAYS, Stream, stream_requests
from nanocp.harness.offline_group import free_port
from nanocp.router.policies import make_policy
from nanocp.router.server import serve_router
from nanocp.v1 import router_pb2

COLLECTIVE_TIMEOUT_S = 8.0  # longer than the 3 s stall that must end nothing; the stalled group fails after it
NEW = 40


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
    undisturbed = await stream_requests(client, NEW)
    victim = ""

    async def lose_a_holder(streams: dict[str, Stream]) -> None:
        nonlocal victim  # a long request's shard holder, not its home: its home's stream fails through the group
        victim = streams["greedy-long-0"].holder_not_home()
        groups.process(victim).send_signal(signal.SIGKILL if how == "killed" else signal.SIGSTOP)

    streams = await stream_requests(client, NEW, lose_a_holder)
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
    again = await stream_requests(client, NEW)
    assert any(s.homes[0].startswith(failed) for s in again.values()), "the restarted group takes requests"


async def test_a_stall_shorter_than_the_collective_timeout_ends_no_stream(groups: Groups, client: AsyncClient) -> None:
    undisturbed = await stream_requests(client, NEW)
    resumed, victim = 0.0, ""

    async def stall_a_holder(streams: dict[str, Stream]) -> None:
        nonlocal resumed, victim  # of the long requests, the last to start: its group is mid-decode
        victim = streams["greedy-long-0"].holder_not_home()
        groups.process(victim).send_signal(signal.SIGSTOP)
        await asyncio.sleep(3.0)
        groups.process(victim).send_signal(signal.SIGCONT)
        resumed = time.monotonic()

    streams = await stream_requests(client, NEW, stall_a_holder)
    assert_undisturbed(streams, undisturbed)
    stalled = [s for s in streams.values() if s.homes[0].startswith(victim[0])]
    assert all(s.arrived[-1] > resumed for s in stalled), "the stalled group decoded on after the stall"
    assert all(len(s.homes) == 1 for s in streams.values()), "no stream moved"
    listing = await client.list_instances()
    assert listing.migrations_total == 0
    assert all(i.state == router_pb2.INSTANCE_STATE_READY for i in listing.instances)
    assert all(p.poll() is None for p in groups.groups[victim[0]].processes), "the group survived"
