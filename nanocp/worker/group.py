"""A decode group: N worker processes that step in lockstep over torch.distributed.

Rendezvous reads RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT (what torchrun, a StatefulSet or a LeaderWorkerSet
provide). Data and control travel apart: the routes of a step's forward move device tensors over the data group
(gloo on CPU, NCCL on GPU), while the step's agreement (counts, metadata rows, frees, timings) goes over a control
group of gloo on host memory, on GPU machines too, so the host learns every size it plans for without reading a
device tensor.

An idle group sleeps on a doorbell instead of spinning: a key in the rendezvous store that the instance which
receives new work sets. Sleeping instances also wake every `idle_check_s` for an empty step, so a peer that died
while the group was idle is noticed within about that long.

Every step begins with the group's agreement (`StepExchange`) on the control group.
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import logging
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from nanocp.worker.group_spec import GroupSpec
from nanocp.worker.planner import Outgoing
from nanocp.worker.step_meta import Meta, MetaRow
from nanocp.worker.timing import StepLog, StepRecord, StepTimer, Straggler, exchange_row

log = logging.getLogger(__name__)


def rendezvous_store(spec: GroupSpec, timeout: datetime.timedelta) -> dist.TCPStore:
    """The group's store: rank 0 serves it, on the rendezvous address only (torch alone would listen on every
    interface), and every rank connects to it."""
    listen_fd = None
    if spec.rank == 0:
        family, kind, proto, _, address = _resolve(spec.master_addr, spec.master_port, timeout.total_seconds())
        listener = socket.socket(family, kind, proto)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restarted rank 0 reuses its port at once
        listener.bind(address)
        listener.listen(socket.SOMAXCONN)
        listen_fd = listener.detach()  # the store owns the socket from here on
    return dist.TCPStore(
        spec.master_addr,
        spec.master_port,
        spec.size,
        is_master=spec.rank == 0,
        timeout=timeout,
        master_listen_fd=listen_fd,
    )


def _resolve(host: str, port: int, timeout_s: float) -> tuple[Any, ...]:
    """The first address of `host`, asking again while the name is not yet published (a pod's DNS record may appear
    a moment after the pod starts)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        except socket.gaierror:
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)


class GroupFailure(RuntimeError):
    """A peer died, stalled past the collective timeout, or the rendezvous broke: the group cannot step again."""


# torch 2.13 renamed all_gather_into_tensor; the GPU machines run an older torch.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class Group:
    def __init__(self, spec: GroupSpec, device: str, timeout_s: float, idle_check_s: float = 1.0) -> None:
        if not 0 <= spec.rank < spec.size:
            raise ValueError(f"RANK {spec.rank} is outside a group of WORLD_SIZE {spec.size}")
        self.spec = spec
        self.device = device
        self.timeout_s = timeout_s  # the router waits as long for an answer before it declares the instance lost
        self.idle_check_s = idle_check_s
        self._idle_epoch = 0
        self._store: dist.TCPStore | None = None
        self._bell: dist.TCPStore | None = None  # its own connection: the loop thread blocks on `_store`
        self._bell_lock = threading.Lock()
        self._local_bell = threading.Event()
        # Names this run of the group alike on every member (step traces derive their ids from it).
        self.run_id = secrets.token_hex(8)
        backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
        self._control: dist.ProcessGroup | None = None  # None: the default group, gloo itself on CPU
        if spec.size == 1:
            return
        if backend == "nccl" and torch.device(device).index is not None:
            torch.cuda.set_device(torch.device(device))  # NCCL binds each process to its current device
        timeout = datetime.timedelta(seconds=timeout_s)
        log.info("rank %d of %d joining %s over %s", spec.rank, spec.size, spec.name, backend)
        self._store = rendezvous_store(spec, timeout)
        if spec.rank == 0:  # rank 0's store is new each run; the others read the key once everyone has joined
            self._store.set("nanocp/run_id", self.run_id)
        dist.init_process_group(backend, store=self._store, rank=spec.rank, world_size=spec.size, timeout=timeout)
        self.run_id = self._store.get("nanocp/run_id").decode()
        if backend == "nccl":
            self._control = dist.new_group(backend="gloo", timeout=timeout)
        self._bell = dist.TCPStore(spec.master_addr, spec.master_port, spec.size, is_master=False, timeout=timeout)
        log.info("rank %d of %d joined %s", spec.rank, spec.size, spec.name)

    @property
    def rank(self) -> int:
        return self.spec.rank

    @property
    def size(self) -> int:
        return self.spec.size

    def exchange_counts(self, local: list[int]) -> list[list[int]]:
        """Every instance's counts for this step (tokens, metadata rows, ...), the same lists on all of them."""
        if self.size == 1:
            return [local]
        counts = torch.zeros(self.size, len(local), dtype=torch.int64)
        try:
            _all_gather(counts, torch.tensor([local], dtype=torch.int64), group=self._control)
        except RuntimeError as exc:
            raise GroupFailure(f"rank {self.rank}: the group's step exchange failed: {exc}") from exc
        return counts.tolist()

    def route_rows(self, rows_to: list[list[list[int]]], counts_from: list[int], width: int) -> list[list[list[int]]]:
        """Sends each peer its rows of `width` integers (rows_to[peer]) over the control group and returns the rows
        from each peer, `counts_from[peer]` of them (known from the step's counts)."""
        if self.size == 1:
            return rows_to
        send = torch.tensor([row for rows in rows_to for row in rows], dtype=torch.int64).view(-1, width)
        received = torch.empty(sum(counts_from), width, dtype=torch.int64)
        sent = [len(rows) for rows in rows_to]
        try:
            dist.all_to_all_single(received, send, counts_from, sent, group=self._control)
        except RuntimeError as exc:
            raise GroupFailure(f"rank {self.rank}: the group's metadata route failed: {exc}") from exc
        flat, offsets = received.tolist(), [0]
        for count in counts_from:
            offsets.append(offsets[-1] + count)
        return [flat[a:b] for a, b in itertools.pairwise(offsets)]

    def ring(self) -> None:
        """Wakes the whole group (any thread may call it): this instance has work."""
        if self._bell is None:
            self._local_bell.set()
            return
        with self._bell_lock:
            self._bell.set(f"bell/{self._idle_epoch}", "1")

    def sleep_until_rung(self) -> None:
        """Called by every instance when a step exchange showed the whole group idle (so epochs agree)."""
        if self._store is None:
            self._local_bell.wait()
            self._local_bell.clear()
            return
        key = f"bell/{self._idle_epoch}"
        try:
            self._store.wait([key], datetime.timedelta(seconds=self.idle_check_s))
        except dist.DistStoreError as exc:
            if "timeout" not in str(exc).lower():
                raise GroupFailure(f"rank {self.rank}: the group's store is gone: {exc}") from exc
        finally:
            self._idle_epoch += 1

    def close(self) -> None:
        """Leaves the group; safe to call twice and after a failure."""
        if self._store is not None and dist.is_initialized():
            with contextlib.suppress(Exception):  # a broken group may fail to tear down; the process ends anyway
                dist.destroy_process_group()


Verdict = Callable[[StepRecord, Straggler], None]


@dataclass(frozen=True)
class Agreement:
    tokens: int  # home tokens over the whole group this step (0: only frees travel)
    max_tokens: int  # the most home tokens any member has: what sizes the step's fixed-capacity routes
    decode_only: bool  # every member's chunks are decodes: the step may take a graph bucket's static layout
    cp_routes: bool  # some member routes query rows, so every member runs the CP routes
    incoming: list[list[MetaRow]]  # the metadata rows from each peer


class StepExchange:
    """The group's agreement at the start of every step, over the control group (host memory, no device read).

    One all-gather carries every member's row: its home tokens, the query rows it routes, whether its step is all
    decodes, how many metadata rows it has for each peer, and the work breakdown of its last timed step. From it every
    member learns whether the group steps at all, whether any CP route runs, whether the step may take a graph bucket
    (and which: the largest home batch decides), how many metadata rows to expect from whom, and (at no extra
    collective) which member was slowest last step and why. Then one route over the control group carries the
    metadata rows: per (request, shard) a home's rows attend on a remote holder, and the frees of ended requests.
    """

    def __init__(self, group: Group, steps: StepLog, timer: StepTimer, on_verdict: Verdict) -> None:
        self.group = group
        self.steps = steps
        self.timer = timer
        self.on_verdict = on_verdict
        self._frees: dict[int, list[int]] = {}  # holder rank -> keys of ended requests whose shards it must free

    def free_later(self, holder: int, key: int) -> None:
        """Tells `holder`, at the next step, to free the shards it holds of request `key`."""
        self._frees.setdefault(holder, []).append(key)

    def take_frees(self) -> dict[int, list[int]]:
        frees, self._frees = self._frees, {}
        return frees

    @property
    def has_frees(self) -> bool:
        return bool(self._frees)

    def agree(self, tokens: int, decode_only: bool, out: Outgoing) -> Agreement | None:
        """The step as the whole group will run it; None when no member has anything to do."""
        size, rank = self.group.size, self.group.rank
        last = self.steps.last()
        remote_rows = sum(a.rows for a in out.remote)
        local = [tokens, remote_rows, int(decode_only), *(len(rows) for rows in out.meta), *exchange_row(last)]
        with self.timer.section("exchange", host=True):  # a member that arrives early waits here: arrival lag
            rows = self.group.exchange_counts(local)
        previous = [row[3 + size :] for row in rows]
        if size > 1 and last is not None and all(p[0] == last.step for p in previous):
            straggler = Straggler.of([p[1:] for p in previous])
            self.steps.mark(last.step, straggler)
            self.on_verdict(last, straggler)
        group_tokens = sum(row[0] for row in rows)
        meta_from = [row[3 + rank] for row in rows]  # metadata rows each peer sends here
        any_meta = any(any(row[3 : 3 + size]) for row in rows)
        if group_tokens == 0 and not any_meta:
            return None
        incoming = self.group.route_rows(out.meta, meta_from, len(Meta)) if any_meta else [[] for _ in range(size)]
        return Agreement(
            group_tokens,
            max(row[0] for row in rows),
            all(row[2] for row in rows),
            any(row[1] for row in rows),
            incoming,
        )
