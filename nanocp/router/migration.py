"""Request migration: a request whose decode group fails continues on a healthy group, on the same client stream.

The router knows each request's prompt and every token it has streamed. When the request's group fails (a member is
unreachable, answers nothing past the group's collective timeout, is removed, or the home's stream fails), the
request is placed again as a new one would be, with prompt + streamed tokens as its prompt and the remaining
max_tokens, and submitted (by the service, nanocp.router.service) with the count of tokens it already generated: its
sampler draws token i with the uniform number of (seed, i) wherever it runs, and the router gave every sampled
request a seed (nanocp.router.validation), so every request goes on with exactly the tokens an undisturbed run
gives. The client sees a pause, then the next token.

Bounded: at most `max_migrations` moves per request. Past that, with no healthy instance left, or with no room on
one before the request's deadline, the stream ends UNAVAILABLE naming the lost instance, as without migration.

The failed placement stays committed in the ledger until every instance it used answers again (or discovery removed
it): its instances take no requests meanwhile, and a group that only stalled holds the pages until it sees the
cancelled stream, so they are never granted twice.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

import grpc
from opentelemetry import trace

from nanocp.placement import Footprint, Placement
from nanocp.router.admission import Admission
from nanocp.router.errors import RequestError
from nanocp.router.metrics import MigrationMetrics
from nanocp.router.registry import LossReason, WorkerRegistry

# A move that waits for room gives up this long before the request's deadline, so the client learns why.
_DEADLINE_MARGIN_S = 0.2


class GroupLost(RequestError):
    """The request's group failed under it: the stream ends UNAVAILABLE unless the request moves."""

    def __init__(self, instance: str, reason: LossReason, message: str) -> None:
        super().__init__(grpc.StatusCode.UNAVAILABLE, message)
        self.instance = instance
        self.reason = reason

    def but(self, why: str) -> GroupLost:
        """The same loss, saying why the request could not move."""
        return GroupLost(self.instance, self.reason, f"{self.message}; {why}")


class Moving(Protocol):
    """A request as a move sees it (the service's live request, which builds the resumed Submit itself)."""

    request_id: str
    migrations: int  # moves so far
    migrated_from: str  # the home it last moved away from

    @property
    def footprint(self) -> Footprint:
        """What the rest of it needs: prompt + tokens streamed so far, and the rest of max_tokens."""
        ...

    @property
    def completion_tokens(self) -> int: ...


class Migrator:
    """Places requests whose group failed on a healthy group; holds the failed placements until their instances
    answer again."""

    def __init__(
        self,
        max_migrations: int,
        admission: Admission,
        registry: WorkerRegistry,
        metrics: MigrationMetrics,
        reserve_output_tokens: int | None,
    ) -> None:
        self.max_migrations = max_migrations
        self._admission = admission
        self._registry = registry
        self._metrics = metrics
        self._reserve = reserve_output_tokens
        self._held: list[Placement] = []
        self.total = 0  # moves since the router started

    async def move(
        self, request: Moving, failed: Placement, lost: GroupLost, time_remaining: float | None, span: trace.Span
    ) -> Placement:
        """The request's new placement, committed; raises `lost` (with why) when it may not move, and Withdrawn
        when it is aborted while waiting for room. Takes over `failed`: held, or released when it does not move."""
        if request.migrations >= self.max_migrations:
            self._admission.release(failed)  # nothing moves: its stream ends now, as without migration
            if request.migrations:
                raise lost.but(f"it moved {request.migrations} time(s) already, as often as --max-migrations allows")
            raise lost
        self._held.append(failed)
        if not self._registry.placeable():
            raise lost.but("no healthy decode group is left to take it")
        try:
            async with asyncio.timeout(None if time_remaining is None else time_remaining - _DEADLINE_MARGIN_S):
                placement = await self._admission.admit(request.request_id, request.footprint.reserved(self._reserve))
        except TimeoutError:
            raise lost.but("no healthy decode group had room for it before its deadline") from None
        except RequestError as exc:
            raise lost.but(f"no healthy decode group can take it ({exc.message})") from None
        request.migrations += 1
        request.migrated_from = failed.home
        self.total += 1
        self._metrics.migrated(lost.reason)
        span.add_event(
            "request_migrated",
            {
                "nanocp.migration.reason": lost.reason,
                "nanocp.migration.lost_instance": lost.instance,
                "nanocp.migration.from_home": failed.home,
                "nanocp.migration.to_home": placement.home,
                "nanocp.migration.tokens_generated": request.completion_tokens,
            },
        )
        return placement

    def release_recovered(self) -> None:
        """Releases the held placements whose instances all answer again, or went away for good (discovery removed
        them: a new worker of the same id starts empty). Called after every load report."""
        if not self._held:
            return
        held_back = {i.id for i in self._registry.instances() if not i.ready}
        recovered = [p for p in self._held if not held_back & {p.home, *(s.instance for s in p.shards)}]
        for placement in recovered:
            self._held.remove(placement)
            self._admission.release(placement)
