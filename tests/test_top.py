"""`nanocp top`: the live view shows every instance's KV occupancy, batch and step time, which rank paced its group
and why, and recent placements; `--once` prints one frame."""

from __future__ import annotations

import asyncio
import sys
from collections import OrderedDict, deque

from conftest import StartCluster, wait_until
from rich.console import Console

from nanocp.internal.v1 import worker_pb2
from nanocp.top import Top, instance_table, placement_table
from nanocp.v1 import common_pb2, router_pb2


def text_of(renderable: object) -> str:
    console = Console(record=True, width=160)
    console.print(renderable)
    return console.export_text()


def rows_of(text: str) -> dict[str, list[str]]:
    """The cells of each table row, by its first cell."""
    rows = [[cell.strip() for cell in line.strip().strip("│").split("│")] for line in text.splitlines()]
    return {cells[0]: cells for cells in rows if len(cells) > 1 and cells[0] not in ("", "instance", "request")}


async def test_top_follows_a_live_request_then_shows_it_ended(start_cluster: StartCluster) -> None:
    cluster = await start_cluster(workers=2)
    stream = cluster.client.generate([1, 2, 3], max_tokens=500, temperature=0.0, ignore_eos=True)
    await anext(stream)
    top = Top(cluster.address)
    try:
        await top.poll()
        live = text_of(top.render())
        rows = rows_of(live)
        (home,) = [r.placement.home for r in top.listing.requests]
        assert "2 instances · 1 live requests" in live
        assert rows["w0"][2] == rows["w1"][2] == "ready"
        assert rows[home][5] == "1", "its home batch"
        assert rows[home][4] == "50% of 64", "its KV pages are committed: (3 + 500 - 1) tokens in pages of 16"
        assert rows[home][6] != "-", "the home's recent steps were read"
        assert rows[stream.request_id[:16]][-1] == "live"
        stream.cancel()
        await cluster.wait_all_pages_free()

        async def ended() -> bool:
            await top.poll()
            return "ended" in text_of(top.render())

        await wait_until(ended, "the placement to show as ended")
    finally:
        await top.close()


def test_the_instance_table_names_who_paced_each_group_and_why() -> None:
    instances = [
        router_pb2.InstanceStatus(
            id=f"w{r}",
            group="g",
            rank=r,
            state=router_pb2.INSTANCE_STATE_READY,
            kv_pages_total=100,
            kv_pages_committed=25 * r,
        )
        for r in range(2)
    ]
    causes = ["attention", "attention", "attention", "host"]
    steps = {
        f"w{r}": deque(
            worker_pb2.StepRecord(step=s + 1, step_ms=10.0 + r, slowest_rank=int(c == "attention"), straggler_cause=c)
            for s, c in enumerate(causes)
        )
        for r in range(2)
    }
    rows = rows_of(text_of(instance_table(instances, steps)))
    assert rows["w1"][4:] == ["25% of 100", "0", "11.0", "75% of 4", "attention 3"]
    assert rows["w0"][4:] == ["0% of 100", "0", "10.0", "25% of 4", "host 1"]


def test_the_placement_table_shows_each_requests_shards_in_position_order() -> None:
    placement = common_pb2.Placement(
        home="w1", shards=[common_pb2.Shard(instance="w0", start=0), common_pb2.Shard(instance="w1", start=512)]
    )
    request = router_pb2.LiveRequest(request_id="long-3", placement=placement, prompt_tokens=900)
    rows = rows_of(text_of(placement_table(OrderedDict([("long-3", (request, True))]))))
    assert rows["long-3"] == ["long-3", "w1", "2", "w0@0 w1@512", "900", "live"]


async def test_nanocp_top_once_prints_a_frame_and_exits(start_cluster: StartCluster) -> None:
    cluster = await start_cluster()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "nanocp", "top", "--router", cluster.address, "--once", stdout=asyncio.subprocess.PIPE
    )
    out, _ = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode == 0
    assert "nanocp top" in out.decode() and "w0" in out.decode()
