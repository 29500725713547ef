"""A move that has to wait for room: it gives up before the request's deadline with UNAVAILABLE saying why, and an
abort while it waits ends it as aborted; either way the failed placement stays held until its instances answer."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest
from opentelemetry import trace
from prometheus_client import CollectorRegistry

from nanocp.placement import Footprint, Placement, Shard
from nanocp.router.admission import Withdrawn
from nanocp.router.metrics import MigrationMetrics
from nanocp.router.migration import GroupLost, Migrator

FAILED = Placement("w0", [Shard(0, 0, 4, "w0")])


@dataclass
class Request:
    request_id: str = "r"
    migrations: int = 0
    migrated_from: str = ""
    completion_tokens: int = 5

    @property
    def footprint(self) -> Footprint:
        return Footprint(8, 16)


class NoRoom:
    """An admission whose queue never places the request: it waits until cancelled, or until `withdraw`."""

    def __init__(self) -> None:
        self.released: list[Placement] = []
        self.waiting = asyncio.Event()
        self._withdrawn = asyncio.Event()

    async def admit(self, request_id: str, footprint: Footprint) -> Placement:
        self.waiting.set()
        await self._withdrawn.wait()
        raise Withdrawn()

    def withdraw(self) -> None:
        self._withdrawn.set()

    def release(self, placement: Placement) -> None:
        self.released.append(placement)


class OneHealthyGroup:
    def placeable(self) -> list[str]:
        return ["w1"]

    def instances(self) -> list[object]:
        return []


def migrator(admission: NoRoom) -> Migrator:
    metrics = MigrationMetrics(CollectorRegistry())
    return Migrator(2, admission, OneHealthyGroup(), metrics, None)  # type: ignore[arg-type]


def lost() -> GroupLost:
    return GroupLost("w0", "unreachable", "instance w0 is unreachable")


async def test_a_move_that_finds_no_room_gives_up_before_the_deadline_saying_why() -> None:
    admission = NoRoom()
    moves = migrator(admission)
    request = Request()
    with pytest.raises(GroupLost) as caught:
        await moves.move(request, FAILED, lost(), 0.3, trace.INVALID_SPAN)
    assert caught.value.message == (
        "instance w0 is unreachable; no healthy decode group had room for it before its deadline"
    )
    assert (request.migrations, moves.total, admission.released) == (0, 0, [])
    assert moves._held == [FAILED]  # its instances may still hold the pages: released once they answer


async def test_an_abort_while_the_move_waits_for_room_ends_it_withdrawn() -> None:
    admission = NoRoom()
    moves = migrator(admission)
    request = Request()
    move = asyncio.create_task(moves.move(request, FAILED, lost(), None, trace.INVALID_SPAN))
    await admission.waiting.wait()
    admission.withdraw()  # what Abort does to a queued request
    with pytest.raises(Withdrawn):
        await move
    assert (request.migrations, moves.total, admission.released) == (0, 0, [])
    assert moves._held == [FAILED]
