"""Admission: place a request now, let it wait for KV memory, or refuse it.

A request that fits nowhere now waits in a bounded queue and is placed as pages are released or instances join: the
oldest first when it fits, and when it does not, the requests behind it that fit (a large request at the head does
not hold up small ones that have room), but only `max_bypass` of them anywhere: then the oldest has precedence. From
then on the free pages it waits for (its policy's `reservation`: its pages on the instance with the most free) are
kept for it, and the others are placed only in the rest (backfilling, as batch schedulers do): the pages it waits
for only grow until it fits, while the rest of the group keeps serving. So no request waits forever. With
`max_bypass` 0 the queue is strictly first in, first out.

A request larger than any instance (a giant: only `dcp` serves one, split over several) does not wait, and is
served only from memory the group has to spare: it is placed when nobody waits for memory and, with it, the group
keeps at least as many pages free as the other requests hold (`_spare_for_giant`: the group's load could double
before anyone waited); else it is refused with "retry later". A giant holds the pages of many ordinary requests for
its whole life: waiting, it would need pages drained on several instances at once and hold back the requests behind
it, and admitted into a filling group, the requests arriving during its life wait for its pages instead (in the
simulator, one giant admitted into a group filling at the rate `balanced` sustains cost `dcp` a bisection step). So
under memory pressure the requests that cost most per request are the ones shed. A request that could not fit even
on an idle cluster is refused at once, naming its size and the capacity.

`AdmissionQueue` is that logic, synchronous: the service wraps it in `Admission` (a queued request awaits a future),
and the simulator (nanocp.sim) drives it directly, so both run the same decisions. Placing and committing happen
with no await in between, so two requests never take the same pages.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
from collections.abc import Callable

import grpc

from nanocp.placement import Footprint, Placement
from nanocp.router.accounting import Ledger
from nanocp.router.errors import NeverFits, RequestError
from nanocp.router.placement import InstanceLoad, PlacementPolicy, by_group
from nanocp.router.registry import WorkerRegistry

DEFAULT_MAX_BYPASS = 32  # requests placed anywhere ahead of the oldest waiting one before it has precedence


class Withdrawn(Exception):
    """A queued request was aborted before it was placed."""


class QueueFull(Exception):
    """No KV memory is free now and the request may not wait for it: the admission queue is full, or the request is
    larger than any instance."""


class AdmissionQueue:
    """Places requests with the policy and commits them in the ledger; queues, in arrival order, what fits nowhere.

    `loads` answers the placeable instances as the ledger counts them now (it is called again after every commit).
    `max_bypass` bounds how many requests are placed ahead of the oldest waiting one.
    """

    def __init__(
        self,
        policy: PlacementPolicy,
        ledger: Ledger,
        loads: Callable[[], list[InstanceLoad]],
        queue_size: int,
        max_bypass: int = DEFAULT_MAX_BYPASS,
    ) -> None:
        if max_bypass < 0:
            raise ValueError(f"max_bypass must be at least 0, got {max_bypass}")
        self.policy = policy
        self.ledger = ledger
        self._loads = loads
        self._queue_size = queue_size
        self._max_bypass = max_bypass
        self._waiting: dict[str, Footprint] = {}  # by request id, in arrival order
        self._bypassed = 0  # requests placed ahead of the oldest waiting one since it became the oldest
        self.waited_total = 0  # requests that had to wait for KV memory before their placement

    @property
    def queued(self) -> int:
        return len(self._waiting)

    def never_fits(self, footprint: Footprint, instances: list[InstanceLoad]) -> str | None:
        """Why the request could not be placed even with `instances` idle, or None when it could."""
        idle = [
            dataclasses.replace(i, pages_committed=0, home_batch=0, routed_rows=0)
            if i.pages_committed or i.home_batch or i.routed_rows
            else i
            for i in instances
        ]
        if not idle or self.policy.place(footprint, idle) is not None:
            return None
        return _never_fits(footprint, idle, self.policy.name)

    def admit(self, request_id: str, footprint: Footprint) -> Placement | None:
        """The request's placement, committed; or None: it waits until `pump` places it. Raises QueueFull.

        Those already waiting did not fit when they last tried, and pages have only been taken since (a release
        pumps), so only the newcomer needs a try; it goes ahead of them while the oldest's bypass budget lasts, and
        after that only outside the pages the oldest waits for. One larger than any instance never waits, and is
        placed only in a group with memory to spare."""
        loads = self._loads()
        largest = max(loads, key=lambda i: i.pages_total, default=None)
        giant = largest is not None and footprint.pages(largest.page_size) > largest.pages_total
        if giant:
            placement = None if self._waiting else self._place(footprint, _spare_for_giant(footprint, loads))
        else:
            placement = self._place(footprint, self._open_loads(loads))
        if placement is not None:
            self._bypassed += bool(self._waiting)
            return placement
        if giant and largest is not None:
            raise QueueFull(
                f"the request's KV cache ({footprint.tokens} tokens) is larger than any instance holds "
                f"({largest.pages_total * largest.page_size} tokens): it is split over several and admitted only when "
                "nobody waits for memory and its group keeps as many pages free as the others hold; retry later"
            )
        if len(self._waiting) >= self._queue_size:
            raise QueueFull(
                f"no KV memory is free now and the admission queue is full ({self._queue_size} requests wait); "
                "retry later"
            )
        self._waiting[request_id] = footprint
        self.waited_total += 1
        return None

    def release(self, placement: Placement) -> list[tuple[str, Placement]]:
        """Gives a request's pages back; answers the waiting requests that are placed now."""
        self.ledger.release(placement)
        return self.pump()

    def withdraw(self, request_id: str) -> bool:
        """Takes a waiting request out of the queue; False when it is not waiting. Pump afterwards: the head may
        have changed."""
        if next(iter(self._waiting), None) == request_id:
            self._bypassed = 0  # a new oldest
        return self._waiting.pop(request_id, None) is not None

    def pump(self) -> list[tuple[str, Placement]]:
        """Places waiting requests, answering them: the oldest ones in arrival order while they fit, then those of
        the next max_bypass behind the oldest that fit, in arrival order (once its bypass budget is spent, only
        outside its reservation)."""
        placed = []
        while self._waiting:
            request_id, footprint = next(iter(self._waiting.items()))
            placement = self._place(footprint, self._loads())
            if placement is None:
                break
            del self._waiting[request_id]
            self._bypassed = 0
            placed.append((request_id, placement))
        # The next max_bypass requests behind the oldest: a bounded look-ahead keeps a pump's work bounded. A request
        # that does not fit changes nothing, so the loads are asked for again only after a placement.
        loads = self._open_loads(self._loads())
        for request_id, footprint in list(itertools.islice(self._waiting.items(), 1, 1 + self._max_bypass)):
            placement = self._place(footprint, loads)
            if placement is not None:
                del self._waiting[request_id]
                self._bypassed += 1
                placed.append((request_id, placement))
                loads = self._open_loads(self._loads())
        return placed

    def _open_loads(self, loads: list[InstanceLoad]) -> list[InstanceLoad] | None:
        """The loads (the ledger's now) a request behind the oldest waiting one may be placed on: all of them while
        the oldest's bypass budget lasts, then less the free pages the oldest waits for (its policy's reservation,
        taken out of the instances' pages, not added to their KV, which the cost model reads); None when nothing may
        go ahead of it (max_bypass 0)."""
        if not self._waiting or self._bypassed < self._max_bypass:
            return loads
        if self._max_bypass == 0:
            return None
        fenced = self.policy.reservation(next(iter(self._waiting.values())), loads)
        return [
            dataclasses.replace(i, pages_total=i.pages_total - fenced[i.id]) if i.id in fenced else i for i in loads
        ]

    def _place(self, footprint: Footprint, loads: list[InstanceLoad] | None) -> Placement | None:
        if loads is None or not _room_for(footprint, loads):
            return None  # no policy could place it: skip asking (a full group's pump asks for many)
        placement = self.policy.place(footprint, loads)
        if placement is not None:
            self.ledger.commit(placement)
        return placement


class Admission:
    """The service's admission: an AdmissionQueue over the registry's placeable instances; a queued request awaits
    its placement."""

    def __init__(self, policy: PlacementPolicy, registry: WorkerRegistry, ledger: Ledger, queue_size: int) -> None:
        self._registry = registry
        self._ledger = ledger
        self.queue = AdmissionQueue(policy, ledger, lambda: [ledger.load(i) for i in registry.placeable()], queue_size)
        self._futures: dict[str, asyncio.Future[Placement]] = {}

    @property
    def policy(self) -> PlacementPolicy:
        return self.queue.policy

    @property
    def queued(self) -> int:
        return self.queue.queued

    @property
    def waited_total(self) -> int:
        return self.queue.waited_total

    async def admit(self, request_id: str, footprint: Footprint, whole: Footprint | None = None) -> Placement:
        """The request's placement for `footprint`, committed in the ledger; the caller must `release` it when the
        request ends. `whole`: what it may grow to (with a reservation), which must fit too (default: footprint).

        Raises RequestError (RESOURCE_EXHAUSTED, UNAVAILABLE) or Withdrawn.
        """
        self._check_capacity(whole or footprint)
        try:
            placement = self.queue.admit(request_id, footprint)
        except QueueFull as exc:
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)) from None
        if placement is not None:
            return placement
        future = self._futures[request_id] = asyncio.get_running_loop().create_future()
        try:
            return await future
        except asyncio.CancelledError:  # the caller gave up (cancelled, deadline) while waiting
            if future.done() and not future.cancelled() and future.exception() is None:
                self.release(future.result())  # placed just before the cancellation landed
            elif self.queue.withdraw(request_id):
                self.pump()  # the head may have changed
            raise
        finally:
            del self._futures[request_id]

    def release(self, placement: Placement) -> None:
        self._deliver(self.queue.release(placement))

    def withdraw(self, request_id: str) -> bool:
        """Aborts a queued request: its `admit` raises Withdrawn. False when it is not queued."""
        if not self.queue.withdraw(request_id):
            return False
        self._futures[request_id].set_exception(Withdrawn())
        self.pump()
        return True

    def pump(self) -> None:
        """Places waiting requests in arrival order for as long as the oldest one fits."""
        self._deliver(self.queue.pump())

    def _deliver(self, placed: list[tuple[str, Placement]]) -> None:
        for request_id, placement in placed:
            future = self._futures.get(request_id)
            if future is None or future.done():  # its caller was cancelled and has not yet withdrawn it
                self.release(placement)
            else:
                future.set_result(placement)

    def _check_capacity(self, footprint: Footprint) -> None:
        instances = [self._ledger.load(i) for i in self._registry.instances() if i.info is not None]
        problem = self.queue.never_fits(footprint, instances)
        if problem is not None:
            raise NeverFits(problem)
        if not self._registry.placeable():
            described = "; ".join(f"{i.name}: {self._registry.problem(i)}" for i in self._registry.instances())
            raise RequestError(
                grpc.StatusCode.UNAVAILABLE, f"no worker instance is ready ({described or 'it has none'})"
            )


def _room_for(footprint: Footprint, loads: list[InstanceLoad]) -> bool:
    """Whether some decode group has as many free pages as the footprint needs: what every placement requires."""
    free: dict[str, int] = {}
    for i in loads:
        if footprint.pages(i.page_size) <= i.pages_free + free.get(i.group, 0):
            return True
        free[i.group] = free.get(i.group, 0) + i.pages_free
    return False


def _spare_for_giant(footprint: Footprint, loads: list[InstanceLoad]) -> list[InstanceLoad]:
    """The instances of the groups that keep, with the giant placed, at least as many pages free as their other
    requests hold: an idle group takes any giant it can hold; a group more than half full takes none."""
    spare = []
    for members in by_group(loads).values():
        committed = sum(i.pages_committed for i in members)
        free_after = sum(i.pages_total for i in members) - committed - footprint.pages(members[0].page_size)
        if free_after >= committed:
            spare.extend(members)
    return spare


def _never_fits(footprint: Footprint, idle: list[InstanceLoad], policy: str) -> str:
    largest = max(idle, key=lambda i: i.pages_total * i.page_size)
    groups: dict[str, int] = {}
    for i in idle:
        groups[i.group] = groups.get(i.group, 0) + i.pages_total * i.page_size
    return (
        f"the request can never fit: its KV cache needs {footprint.tokens} tokens ({footprint.prompt_tokens} prompt "
        f"+ {footprint.max_tokens} max_tokens - 1) = {footprint.pages(largest.page_size)} pages of "
        f"{largest.page_size} tokens, but the largest instance holds {largest.pages_total} pages "
        f"({largest.pages_total * largest.page_size} tokens) and the largest decode group {max(groups.values())} "
        f"tokens, and the {policy} policy cannot place it even on idle instances; shorten the prompt or lower "
        f"max_tokens"
    )
