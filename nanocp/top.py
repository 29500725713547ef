"""`nanocp top`: a live view of a cluster in the terminal, refreshed in place (rich).

It polls the router's ListInstances (per-instance KV pages and home batch, live placements and the requests that
moved to another group after theirs failed) and every worker's
GetSteps (recent step times and the group's straggler verdicts), so it must reach the workers' addresses as the
router lists them: run it where the router runs (in Kubernetes, `kubectl exec` into the router pod).
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
from collections import Counter, OrderedDict, deque
from collections.abc import Iterable

import grpc
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from nanocp.auth import TokenFile, bearer_token
from nanocp.client import AsyncClient, Credentials, NanocpError
from nanocp.internal.v1 import worker_pb2, worker_pb2_grpc
from nanocp.v1 import router_pb2

RECENT_PLACEMENTS = 10


class Top:
    """What the view shows, updated by `poll`: instances, recent steps per instance, recent placements."""

    def __init__(
        self,
        router: str,
        window: int = 200,
        credentials: Credentials | None = None,
        internal_token: TokenFile | str | None = None,
    ) -> None:
        """`window`: the recent steps per instance that step times and straggler shares are taken over;
        `credentials`: the token (an admin token shows every request) and TLS settings for the router;
        `internal_token`: the workers' shared token, which GetSteps needs when they require one."""
        self.router = router
        self._worker_interceptors = bearer_token(internal_token) if internal_token is not None else None
        self._window = window
        c = credentials or Credentials()
        self._client = AsyncClient(
            router, max_retries=0, token=c.token, tls=c.tls, ca_file=c.ca_file, server_name=c.server_name
        )
        self._channels: dict[str, grpc.aio.Channel] = {}
        self.listing = router_pb2.ListInstancesResponse()
        self.error = ""  # why the last poll of the router failed
        self.steps: Steps = {}  # by instance id
        self.placements: OrderedDict[str, tuple[router_pb2.LiveRequest, bool]] = OrderedDict()  # newest last; live?

    async def close(self) -> None:
        await self._client.close()
        for channel in self._channels.values():
            await channel.close()

    async def poll(self) -> None:
        try:
            self.listing = await self._client.list_instances(timeout=5)
            self.error = ""
        except NanocpError as exc:
            self.error = str(exc)
            return
        ready = [i for i in self.listing.instances if i.state == router_pb2.INSTANCE_STATE_READY]
        await asyncio.gather(*(self._poll_steps(i) for i in ready))  # the others keep their last steps on view
        live = {r.request_id: r for r in self.listing.requests}
        for request_id, (request, _) in list(self.placements.items()):
            self.placements[request_id] = (live.get(request_id, request), request_id in live)  # it may have grown
        for request_id, request in live.items():
            self.placements.setdefault(request_id, (request, True))
        while len(self.placements) > RECENT_PLACEMENTS:
            self.placements.popitem(last=False)

    async def _poll_steps(self, instance: router_pb2.InstanceStatus) -> None:
        steps = self.steps.setdefault(instance.id, deque(maxlen=self._window))
        channel = self._channels.get(instance.address)
        if channel is None:
            channel = self._channels[instance.address] = grpc.aio.insecure_channel(
                instance.address, interceptors=self._worker_interceptors
            )
        after = steps[-1].step if steps else 0
        request = worker_pb2.GetStepsRequest(after_step=after, limit=self._window)
        with contextlib.suppress(grpc.aio.AioRpcError):  # it stopped answering since the router listed it
            response = await worker_pb2_grpc.WorkerServiceStub(channel).GetSteps(request, timeout=2)
            steps.extend(response.steps)

    def render(self) -> RenderableType:
        listing = self.listing
        header = Text(f"nanocp top · router {self.router}", style="bold")
        header.append(
            f" · {len(listing.instances)} instances · {len(listing.requests)} live requests"
            f" · {listing.queued} waiting for KV memory · {listing.migrations_total} moved after a group failed"
        )
        if self.error:
            header.append(f" · router unreachable: {self.error}", style="red")
        return Group(header, instance_table(listing.instances, self.steps), placement_table(self.placements))


Steps = dict[str, deque[worker_pb2.StepRecord]]


def _verdicts(instances: Iterable[router_pb2.InstanceStatus], steps: Steps) -> dict[str, list[worker_pb2.StepRecord]]:
    """Per group, the judged steps of its lowest-ranked member that has any (every member holds the same verdicts)."""
    verdicts: dict[str, list[worker_pb2.StepRecord]] = {}
    for instance in sorted(instances, key=lambda i: i.rank):
        judged = [r for r in steps.get(instance.id, ()) if r.slowest_rank >= 0]
        if judged and instance.group not in verdicts:
            verdicts[instance.group] = judged
    return verdicts


def instance_table(instances: Iterable[router_pb2.InstanceStatus], steps: Steps) -> Table:
    instances = list(instances)
    verdicts = _verdicts(instances, steps)
    table = Table(
        "instance",
        "group/rank",
        "state",
        "KV occupancy",
        "",
        "home batch",
        "step ms (p50)",
        "slowest",
        "why",
        title="instances",
        title_justify="left",
    )
    for i in sorted(instances, key=lambda i: (i.group, i.rank)):
        recent = steps.get(i.id, ())
        total = max(i.kv_pages_total, 1)
        used = max(i.kv_pages_committed, i.kv_pages_in_use)
        judged = verdicts.get(i.group, [])
        mine = [r for r in judged if r.slowest_rank == i.rank]
        causes = Counter(r.straggler_cause for r in mine).most_common(2)
        table.add_row(
            i.id,
            f"{i.group}/{i.rank}",
            Text("ready", "green") if i.state == router_pb2.INSTANCE_STATE_READY else Text("unavailable", "red"),
            ProgressBar(total=total, completed=used, width=24),
            f"{100 * used / total:4.0f}% of {i.kv_pages_total}",
            str(i.home_batch),
            f"{statistics.median(r.step_ms for r in recent):.1f}" if recent else "-",
            f"{100 * len(mine) / len(judged):.0f}% of {len(judged)}" if judged else "-",
            ", ".join(f"{cause} {count}" for cause, count in causes) or "-",
        )
    return table


def placement_table(placements: OrderedDict[str, tuple[router_pb2.LiveRequest, bool]]) -> Table:
    table = Table("request", "home", "CP", "KV shards (first position)", "prompt", "state", title="recent placements")
    table.title_justify = "left"
    for request_id, (request, live) in reversed(placements.items()):
        shards = " ".join(f"{s.instance}@{s.start}" for s in request.placement.shards)
        table.add_row(
            request_id[:16],
            request.placement.home,
            str(len(request.placement.shards)),
            shards,
            str(request.prompt_tokens),
            _state(request, live),
        )
    return table


def _state(request: router_pb2.LiveRequest, live: bool) -> Text:
    state = Text("live" if live else "ended")
    if request.migrations:
        state.append(f", moved {request.migrations}x from {request.migrated_from}", style="yellow")
    return state


async def run_top(
    router: str,
    interval: float,
    once: bool,
    console: Console,
    window: int = 200,
    credentials: Credentials | None = None,
    internal_token: TokenFile | str | None = None,
) -> None:
    """Polls every `interval` seconds and redraws in place until interrupted; `once`: prints one frame."""
    top = Top(router, window, credentials, internal_token)
    try:
        await top.poll()
        if once:
            console.print(top.render())
            return
        with Live(top.render(), console=console, auto_refresh=False, transient=False) as live:
            while True:
                await asyncio.sleep(interval)
                await top.poll()
                live.update(top.render(), refresh=True)
    finally:
        await top.close()
