"""A worker removed (its pod went away) while a load report from it is in flight: closing its channel cancels the
call, and whoever waited for the report (ListInstances refreshing the loads) still gets its answer."""

from __future__ import annotations

import asyncio

import grpc
from conftest import HOST

from nanocp.internal.v1 import worker_pb2, worker_pb2_grpc
from nanocp.model_config import PRESETS
from nanocp.router.registry import WorkerRegistry

TINY = PRESETS["tiny"]


class SlowToReport(worker_pb2_grpc.WorkerServiceServicer):
    """A worker that answers its first load report, then holds every later one until the call is cancelled."""

    def __init__(self) -> None:
        self.reports = 0
        self.holding = asyncio.Event()

    async def GetInfo(self, request: worker_pb2.GetInfoRequest, context: object) -> worker_pb2.GetInfoResponse:
        return worker_pb2.GetInfoResponse(
            instance_id="w0",
            model=TINY.name,
            vocab_size=TINY.vocab_size,
            max_context=TINY.max_context,
            page_size=16,
            kv_pages_total=64,
            group_size=1,
        )

    async def GetLoad(self, request: worker_pb2.GetLoadRequest, context: object) -> worker_pb2.GetLoadResponse:
        self.reports += 1
        if self.reports > 1:
            self.holding.set()
            await asyncio.Event().wait()
        return worker_pb2.GetLoadResponse(kv_pages_total=64)


async def test_a_refresh_in_flight_when_its_worker_is_removed_still_returns() -> None:
    worker = SlowToReport()
    server = grpc.aio.server()
    worker_pb2_grpc.add_WorkerServiceServicer_to_server(worker, server)
    address = f"{HOST}:{server.add_insecure_port(f'{HOST}:0')}"
    await server.start()
    registry = WorkerRegistry(TINY, heartbeat_s=3600)
    try:
        await registry.add(address)
        assert [i.ready for i in registry.instances()] == [True]
        refresh = asyncio.create_task(registry.refresh())
        await worker.holding.wait()  # the report is in flight
        await registry.remove(address)  # closes the channel: grpc.aio cancels the call
        await asyncio.wait_for(refresh, timeout=30)  # answers (raised CancelledError before the fix)
        assert registry.instances() == []
    finally:
        await registry.stop()
        await server.stop(None)
