"""Admission: place a request now, let it wait for KV memory, or refuse it.

A request that fits nowhere now waits in a bounded FIFO queue and is placed, in arrival order, as pages are released
or instances join; while anyone waits, newcomers queue behind them so a large request is not starved by small ones.
A request that could not fit even on an idle cluster is refused at once, naming its size and the capacity.
Placing and committing happen with no await in between, so two requests never take the same pages.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections import deque
from dataclasses import dataclass

import grpc

from nanocp.router.accounting import Ledger
from nanocp.router.errors import RequestError
from nanocp.router.placement import Footprint, InstanceLoad, Placement, PlacementPolicy
from nanocp.router.registry import WorkerRegistry


class Withdrawn(Exception):
    """A queued request was aborted before it was placed."""


@dataclass(eq=False)
class _Waiter:
    request_id: str
    footprint: Footprint
    future: asyncio.Future[Placement]


class Admission:
    def __init__(self, policy: PlacementPolicy, registry: WorkerRegistry, ledger: Ledger, queue_size: int) -> None:
        self.policy = policy
        self._registry = registry
        self._ledger = ledger
        self._queue_size = queue_size
        self._queue: deque[_Waiter] = deque()
        self.waited_total = 0  # requests that had to wait for KV memory before their placement

    @property
    def queued(self) -> int:
        return sum(not w.future.done() for w in self._queue)

    async def admit(self, request_id: str, footprint: Footprint) -> Placement:
        """The request's placement, committed in the ledger; the caller must `release` it when the request ends.

        Raises RequestError (RESOURCE_EXHAUSTED, UNAVAILABLE) or Withdrawn.
        """
        self._check_capacity(footprint)
        if not self._queue:
            placement = self._place(footprint)
            if placement is not None:
                return placement
        if self.queued >= self._queue_size:
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"no KV memory is free now and the admission queue is full ({self._queue_size} requests wait); "
                "retry later",
            )
        waiter = _Waiter(request_id, footprint, asyncio.get_running_loop().create_future())
        self._queue.append(waiter)
        self.waited_total += 1
        try:
            return await waiter.future
        except asyncio.CancelledError:  # the caller gave up (cancelled, deadline) while waiting
            if waiter.future.done() and not waiter.future.cancelled() and waiter.future.exception() is None:
                self.release(waiter.future.result())  # placed just before the cancellation landed
            else:
                self._forget(waiter)
            raise

    def release(self, placement: Placement) -> None:
        self._ledger.release(placement)
        self.pump()

    def withdraw(self, request_id: str) -> bool:
        """Aborts a queued request: its `admit` raises Withdrawn. False when it is not queued."""
        waiter = next((w for w in self._queue if w.request_id == request_id and not w.future.done()), None)
        if waiter is None:
            return False
        waiter.future.set_exception(Withdrawn())
        self._forget(waiter)
        return True

    def pump(self) -> None:
        """Places waiting requests in arrival order for as long as the oldest one fits."""
        while self._queue:
            head = self._queue[0]
            if not head.future.done():
                placement = self._place(head.footprint)
                if placement is None:
                    return
                head.future.set_result(placement)
            self._queue.popleft()

    def _forget(self, waiter: _Waiter) -> None:
        if waiter in self._queue:  # a pump may have dropped it already, once its future was cancelled
            self._queue.remove(waiter)
        self.pump()  # the head may have changed

    def _place(self, footprint: Footprint) -> Placement | None:
        loads = [self._ledger.load(i) for i in self._registry.placeable()]
        placement = self.policy.place(footprint, loads)
        if placement is not None:
            self._ledger.commit(placement)
        return placement

    def _check_capacity(self, footprint: Footprint) -> None:
        instances = [i for i in self._registry.instances() if i.info is not None]
        if instances:
            idle = [
                dataclasses.replace(self._ledger.load(i), pages_committed=0, home_batch=0, routed_rows=0)
                for i in instances
            ]
            if self.policy.place(footprint, idle) is None:
                raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, _never_fits(footprint, idle, self.policy.name))
        if not self._registry.placeable():
            instances = self._registry.instances()
            problems = "; ".join(f"{i.name}: {self._registry.problem(i)}" for i in instances) or "it has none"
            raise RequestError(grpc.StatusCode.UNAVAILABLE, f"no worker instance is ready ({problems})")


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
