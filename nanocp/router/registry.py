"""Which workers exist and which of them answer.

Discovery names worker addresses (a static list, or worker pods watched in Kubernetes: nanocp.router.discovery) and
removes those that go away. The registry asks each new worker what it serves (GetInfo) and refuses one whose model
differs from the router's, then polls GetLoad as a heartbeat. A worker that refuses a heartbeat (its connection
fails, or it says its group failed), fails a stream, or answers nothing for longer than its liveness deadline is
UNAVAILABLE and gets no new requests; it is checked again from GetInfo on (it may have restarted) and is READY once it
answers.

The liveness deadline is the group's own collective timeout, which each worker reports: a stall its group survives
(its peers wait that long in a collective) does not end the group's streams, and a stall past it fails the group on
both sides at about the same time.

Instances of one decode group step together, so they take requests only while the whole group is ready: a ready
worker whose group lacks a member is not placeable.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, cast

import grpc

from nanocp.internal.v1 import worker_pb2, worker_pb2_grpc
from nanocp.model_config import ModelConfig

log = logging.getLogger(__name__)

# Why an instance was lost: its connection failed or it said its group failed, it answered nothing within its
# liveness deadline, discovery removed it, or a request stream on it failed.
LossReason = Literal["unreachable", "unresponsive", "removed", "stream_failed"]


@dataclass(eq=False)
class Instance:
    address: str
    channel: Any  # grpc.aio.Channel
    stub: worker_pb2_grpc.WorkerServiceAsyncStub
    info: worker_pb2.GetInfoResponse | None = None
    ready: bool = False
    problem: str = "not contacted yet"  # why it is not ready
    pages_in_use: int = 0  # the worker's own count at its last load report
    answered_at: float = 0.0  # time.monotonic() of its last answer to a probe

    @property
    def id(self) -> str:
        return self.info.instance_id if self.info is not None else self.address

    @property
    def name(self) -> str:
        """For messages: the id and the address, once the worker has said its id."""
        return f"{self.id} at {self.address}" if self.info is not None else self.address


class Discovery(Protocol):
    async def run(self, registry: WorkerRegistry) -> None:
        """Adds workers to the registry as they appear (and removes those that go away)."""
        ...


class StaticDiscovery:
    def __init__(self, addresses: Sequence[str]) -> None:
        self._addresses = list(addresses)

    async def run(self, registry: WorkerRegistry) -> None:
        await asyncio.gather(*(registry.add(address) for address in self._addresses))


class WorkerRegistry:
    def __init__(
        self,
        model: ModelConfig,
        heartbeat_s: float = 1.0,
        connect: Callable[[str], grpc.aio.Channel] = grpc.aio.insecure_channel,
    ) -> None:
        """`connect` makes the channel to a worker's address (TLS and the internal token: nanocp.router.server)."""
        self._model = model
        self._connect = connect
        self._heartbeat_s = heartbeat_s
        # One probe's wait; a worker whose probes time out stays ready until its liveness deadline passes.
        self._probe_timeout_s = max(heartbeat_s, 1.0)
        # Runs after every load report of a ready instance: capacity may have appeared.
        self.on_load: Callable[[Instance], None] = lambda instance: None
        # Runs when a ready instance is lost: its group can no longer step.
        self.on_lost: Callable[[Instance, str, LossReason], None] = lambda instance, problem, reason: None
        self._instances: dict[str, Instance] = {}  # by address
        self._heartbeats: dict[str, asyncio.Task[None]] = {}  # by address

    def instances(self) -> list[Instance]:
        return list(self._instances.values())

    def placeable(self) -> list[Instance]:
        """Ready instances whose whole group is ready."""
        return [i for i in self._instances.values() if i.ready and self.group_problem(i) is None]

    def problem(self, instance: Instance) -> str:
        """Why the instance takes no requests ("" when it does)."""
        if not instance.ready:
            return instance.problem
        return self.group_problem(instance) or ""

    def group_problem(self, instance: Instance) -> str | None:
        if instance.info is None or instance.info.group_size <= 1:
            return None
        ready = sum(i.ready for i in self.group_of(instance))
        if ready < instance.info.group_size:
            return f"its group {instance.info.group} has {ready} of {instance.info.group_size} members ready"
        return None

    def get(self, instance_id: str) -> Instance:
        for instance in self._instances.values():
            if instance.id == instance_id:
                return instance
        raise KeyError(f"no instance {instance_id!r}")

    async def add(self, address: str) -> None:
        """Checks the worker once (so a router starts with its workers known), then keeps a heartbeat on it."""
        if address in self._instances:
            return
        channel = self._connect(address)
        stub = cast("worker_pb2_grpc.WorkerServiceAsyncStub", worker_pb2_grpc.WorkerServiceStub(channel))
        instance = Instance(address, channel, stub)
        self._instances[address] = instance
        await self._check(instance)
        self._heartbeats[address] = asyncio.create_task(self._heartbeat(instance), name=f"heartbeat {address}")

    async def remove(self, address: str) -> None:
        """Forgets a worker that went away (its pod was deleted); its live streams are lost as on a failed heartbeat."""
        instance = self._instances.get(address)
        if instance is None:
            return
        task = self._heartbeats.pop(address, None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.mark_unavailable(instance, "it was removed by discovery", "removed")
        del self._instances[address]
        await instance.channel.close()

    async def refresh(self) -> None:
        """Asks every ready instance for its load now, so a caller sees current numbers, not a heartbeat-old one."""
        await asyncio.gather(*(self._check(i) for i in self._instances.values() if i.ready))

    def mark_unavailable(self, instance: Instance, problem: str, reason: LossReason = "unreachable") -> None:
        was_ready = instance.ready
        if was_ready or problem != instance.problem:
            log.warning("worker %s is unavailable: %s", instance.name, problem)
        instance.ready = False
        instance.problem = problem
        if was_ready:
            self.on_lost(instance, problem, reason)

    def _liveness_s(self, instance: Instance) -> float:
        """How long a ready instance may answer nothing before it is lost: its group's collective timeout (one
        probe's wait for a worker that does not report one)."""
        reported = instance.info.collective_timeout_s if instance.info is not None else 0.0
        return max(reported, self._probe_timeout_s)

    def group_of(self, instance: Instance) -> list[Instance]:
        """The instances that step with this one (itself included)."""
        if instance.info is None or instance.info.group_size <= 1:
            return [instance]
        group = instance.info.group
        return [i for i in self._instances.values() if i.info is not None and i.info.group == group]

    async def stop(self) -> None:
        for task in self._heartbeats.values():
            task.cancel()
        for task in self._heartbeats.values():
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await asyncio.gather(*(i.channel.close() for i in self._instances.values()))

    async def _heartbeat(self, instance: Instance) -> None:
        while True:
            await asyncio.sleep(self._heartbeat_s)
            await self._check(instance)

    async def _check(self, instance: Instance) -> None:
        try:
            if not instance.ready:
                info = await instance.stub.GetInfo(worker_pb2.GetInfoRequest(), timeout=self._probe_timeout_s)
                problem = self._mismatch(instance, info)
                if problem is not None:
                    self.mark_unavailable(instance, problem)
                    return
                instance.info = info
            load = await instance.stub.GetLoad(worker_pb2.GetLoadRequest(), timeout=self._probe_timeout_s)
        except grpc.aio.AioRpcError as exc:
            self._unanswered(instance, exc)
            return
        except (asyncio.CancelledError, grpc.aio.UsageError):
            # Removed meanwhile: closing its channel cancels the calls on it and refuses new ones. Whoever waited for
            # the report (ListInstances refreshing the loads) must still get its answer; only our own cancellation
            # goes on up.
            task = asyncio.current_task()
            if self._instances.get(instance.address) is instance or (task is not None and task.cancelling()):
                raise
            return
        instance.answered_at = time.monotonic()
        instance.pages_in_use = load.kv_pages_in_use
        if load.draining:  # its streams go on; only new requests must go elsewhere, and not to its group
            instance.ready, instance.problem = False, "it is shutting down (its live streams finish)"
            return
        if not instance.ready:
            log.info("worker %s is ready (%d KV pages)", instance.name, load.kv_pages_total)
            instance.ready = True
            instance.problem = ""
        self.on_load(instance)

    def _unanswered(self, instance: Instance, exc: grpc.aio.AioRpcError) -> None:
        """A failed probe: a ready instance that is only slow stays ready until its liveness deadline passes."""
        problem = f"{exc.code().name}: {exc.details()}"
        if not instance.ready or exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
            self.mark_unavailable(instance, problem)
            return
        silent = time.monotonic() - instance.answered_at
        deadline = self._liveness_s(instance)
        if silent >= deadline:
            why = f"no answer for {silent:.1f} s, past its group's collective timeout of {deadline:g} s ({problem})"
            self.mark_unavailable(instance, why, "unresponsive")

    def _mismatch(self, instance: Instance, info: worker_pb2.GetInfoResponse) -> str | None:
        """Why the router must not place on this worker, or None."""
        m = self._model
        theirs = (info.model, info.vocab_size, info.max_context)
        if theirs != (m.name, m.vocab_size, m.max_context):
            return (
                f"it serves model {info.model!r} (vocab {info.vocab_size}, context {info.max_context}) but the "
                f"router serves {m.name!r} (vocab {m.vocab_size}, context {m.max_context}); fix --model on one side"
            )
        other = next((i for i in self._instances.values() if i is not instance and i.id == info.instance_id), None)
        if other is not None:
            return f"instance id {info.instance_id!r} is already taken by the worker at {other.address}"
        return None
