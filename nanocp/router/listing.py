"""ListInstances's answer: every instance with its state and load, and the live requests a caller may see."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from nanocp.placement import Placement
from nanocp.router.accounting import Ledger
from nanocp.router.admission import Admission
from nanocp.router.registry import WorkerRegistry
from nanocp.v1 import common_pb2, router_pb2
from nanocp.wire import placement_to_proto


class Listed(Protocol):
    """What the listing reads of a live request (nanocp.router.service's)."""

    request_id: str
    placement: Placement | None
    prompt: list[int]
    sampling: common_pb2.SamplingParams
    migrations: int
    migrated_from: str


async def list_instances(
    registry: WorkerRegistry, ledger: Ledger, admission: Admission, migrations_total: int, visible: Iterable[Listed]
) -> router_pb2.ListInstancesResponse:
    """The instances as the router sees them now (their load asked again), and the placed requests of `visible`."""
    await registry.refresh()
    response = router_pb2.ListInstancesResponse(
        queued=admission.queued, waited_total=admission.waited_total, migrations_total=migrations_total
    )
    for instance in registry.instances():
        problem = registry.problem(instance)
        status = response.instances.add(
            id=instance.id,
            address=instance.address,
            state=router_pb2.INSTANCE_STATE_UNAVAILABLE if problem else router_pb2.INSTANCE_STATE_READY,
            home_batch=ledger.home_batch(instance.id),
            kv_pages_committed=ledger.pages_committed(instance.id),
            kv_pages_in_use=instance.pages_in_use,
            problem=problem,
        )
        if instance.info is not None:
            status.kv_pages_total = instance.info.kv_pages_total
            status.page_size = instance.info.page_size
            status.group = instance.info.group
            status.rank = instance.info.rank
    for live in visible:
        if live.placement is not None:
            response.requests.add(
                request_id=live.request_id,
                placement=placement_to_proto(live.placement),
                prompt_tokens=len(live.prompt),  # as asked, also once it moved
                max_tokens=live.sampling.max_tokens,
                migrations=live.migrations,
                migrated_from=live.migrated_from,
            )
    return response
