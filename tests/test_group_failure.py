"""A decode group fails fast and loudly when a member dies or stalls, and is picked up again once restarted.

The workers are real processes (`nanocp worker` with RANK/WORLD_SIZE set), the router runs in the test.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from conftest import COLLECTIVE_TIMEOUT_S, HEARTBEAT_S, HOST, ProcessGroup, all_ready, wait_until

from nanocp.client import AsyncClient, Unavailable
from nanocp.harness.offline_group import free_port
from nanocp.router.server import RouterServer, serve_router

LONG = 4000  # new tokens: far more than a test waits for


@pytest.fixture
async def group_and_router() -> AsyncIterator[tuple[ProcessGroup, RouterServer, AsyncClient]]:
    group = ProcessGroup.start([free_port(), free_port()])
    router = await serve_router("tiny", [f"{HOST}:{p}" for p in group.ports], HOST, 0, heartbeat_s=HEARTBEAT_S)
    client = AsyncClient(f"{HOST}:{router.port}", max_retries=0)
    try:
        await wait_until(lambda: all_ready(client, True), "the group to be ready", timeout=90)
        yield group, router, client
    finally:
        await client.close()
        await router.stop()
        group.kill()


async def exits(process: subprocess.Popen[bytes]) -> int:
    while process.poll() is None:
        await asyncio.sleep(0.05)
    return process.returncode


@pytest.mark.parametrize("how", ["killed", "stalled"])
async def test_a_lost_member_fails_the_group_then_a_restarted_group_serves_again(
    group_and_router: tuple[ProcessGroup, RouterServer, AsyncClient], how: str
) -> None:
    group, _, client = group_and_router
    stream = client.generate([1, 2, 3], max_tokens=LONG, temperature=0.0, ignore_eos=True)
    first = await anext(stream)
    survivor = 0 if first.placement.home == "w1" else 1
    victim = group.processes[1 - survivor]
    victim.send_signal(signal.SIGKILL if how == "killed" else signal.SIGSTOP)

    with pytest.raises(Unavailable) as lost:
        async for _ in stream:
            pass
    assert "w" in lost.value.message, "the message names the instance"
    # The survivor notices (a closed connection, or the collective timeout) and exits non-zero, so the group restarts.
    assert await asyncio.wait_for(exits(group.processes[survivor]), timeout=COLLECTIVE_TIMEOUT_S + 30) == 1
    await wait_until(lambda: all_ready(client, False), "the router to mark the group unavailable")
    with pytest.raises(Unavailable) as refused:
        await anext(client.generate([1, 2, 3], max_tokens=4))
    assert "ready" in refused.value.message

    if how == "stalled":
        os.kill(victim.pid, signal.SIGCONT)
    group.kill()
    restarted = ProcessGroup.start(group.ports)
    group.processes = restarted.processes  # so the fixture stops these too
    await wait_until(lambda: all_ready(client, True), "the restarted group to be picked up", timeout=90)
    chunks = [c async for c in client.generate([1, 2, 3], max_tokens=6, temperature=0.0, ignore_eos=True)]
    assert sum(len(c.token_ids) for c in chunks) == 6


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


async def test_an_idle_group_sleeps_instead_of_spinning(
    group_and_router: tuple[ProcessGroup, RouterServer, AsyncClient],
) -> None:
    group, _, client = group_and_router
    chunks = [c async for c in client.generate([5, 6], max_tokens=4, temperature=0.0, ignore_eos=True)]
    assert sum(len(c.token_ids) for c in chunks) == 4
    before = [cpu_seconds(p.pid) for p in group.processes]
    await asyncio.sleep(3.0)
    used = [cpu_seconds(p.pid) - b for p, b in zip(group.processes, before, strict=True)]
    # A spinning step loop burns about a core (3 s here); heartbeats and the once-a-second idle check far less.
    assert max(used) < 0.5, f"CPU seconds used by idle workers over 3 s: {used}"
