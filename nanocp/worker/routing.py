"""The routing layer of a group's step: rows to peers and back, through one all-to-all per route.

Two transports share it. `Route` moves exactly the rows that travel, by per-peer counts the host knows from the step
plan (variable splits): eager steps' CP routes, whose sizes the step's metadata exchange told every holder before
the step. `FixedRoute` moves per-peer buffers of a fixed capacity: the MoE dispatch and combine, and every route of
a static (graphed) step.

Every route of a step (MoE dispatch and combine, CP query rows, remote K, V, partials back) writes its rows into a
send buffer of `peers x capacity` slots: a row bound for peer p takes slot p * capacity + i, i its rank among the
rows bound for p (rows keep their order). One all-to-all of equal splits moves the buffers, so its sizes are known
before the step and never read back from the device: a CUDA graph can capture it, and the same code runs on CPU over
gloo. The capacity comes from the step's bucket (a worst case: every row bound for one peer), so a row can never
overflow its peer's share. Slots no row took keep a fill value (a tag of -1 marks them invalid).

Slots are computed on the device for routes whose destinations only the device knows (MoE: the router's top-k), or
planned on the host from the step's metadata (CP: what each home announced to each holder).

The all-to-all of equal splits moves the padding too: cheap on one host and what one GPU can test; a device-count
all-to-all (torch symmetric memory's all_to_all_vdev, which moves valid rows only) is the transport for several GPUs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


def grouped() -> bool:
    """Whether steps route through a process group (one of size 1 too: how one GPU tests the routed path)."""
    return dist.is_available() and dist.is_initialized()


def slots_by_destination(destinations: torch.Tensor, peers: int, capacity: int) -> torch.Tensor:
    """Each row's slot: its destination's first slot plus its rank among the rows bound there (on the device)."""
    # A comparison rather than F.one_hot, which checks its input's range on the host (a sync inside a graph).
    one_hot = (destinations[:, None] == torch.arange(peers, device=destinations.device)).to(torch.int64)
    rank_there = (one_hot.cumsum(dim=0) - one_hot).mul_(one_hot).sum(dim=1)
    return destinations * capacity + rank_there


@dataclass(frozen=True)
class Route:
    """Who sends how many rows to whom, as seen from one instance; used both ways."""

    send_rows: list[int]  # rows to each peer, in peer order
    recv_rows: list[int]  # rows from each peer

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        """rows: (sum(send_rows), ...) ordered by destination; returns what peers sent us, ordered by source."""
        return _move(rows, self.send_rows, self.recv_rows)

    def backward(self, rows: torch.Tensor) -> torch.Tensor:
        """The way back: rows in the order `forward` returned them go home, arriving in the order they were sent."""
        return _move(rows, self.recv_rows, self.send_rows)


def _move(rows: torch.Tensor, send: list[int], recv: list[int]) -> torch.Tensor:
    if not grouped():
        return rows
    out = rows.new_empty((sum(recv), *rows.shape[1:]))
    dist.all_to_all_single(out, rows.contiguous(), recv, send)
    return out


def exchange(buffer: torch.Tensor) -> torch.Tensor:
    """Peer p's share of `buffer` (its p-th equal slice) goes to p; returns what each peer sent here, in peer order.
    The identity without peers."""
    if not grouped():
        return buffer
    received = torch.empty_like(buffer)
    dist.all_to_all_single(received, buffer.contiguous())
    return received


class PendingExchange:
    """An exchange under way: `wait()` gives what peers sent (on CUDA the current stream waits, the host does not)."""

    def __init__(self, received: torch.Tensor, work: dist.Work | None) -> None:
        self._received = received
        self._work = work

    def wait(self) -> torch.Tensor:
        """What peers sent; a second call returns it at once."""
        if self._work is not None:
            self._work.wait()
            self._work = None
        return self._received


def start_exchange(buffer: torch.Tensor) -> PendingExchange:
    """`exchange`, begun and not waited for: what runs before `wait()` overlaps the transfer."""
    if not grouped():
        return PendingExchange(buffer, None)
    received = torch.empty_like(buffer)
    return PendingExchange(received, dist.all_to_all_single(received, buffer.contiguous(), async_op=True))


class FixedRoute:
    """One route of a step: which slot of the send buffer each row takes, with `capacity` slots per peer."""

    def __init__(self, slots: torch.Tensor, peers: int, capacity: int) -> None:
        self.slots = slots
        self.peers = peers
        self.capacity = capacity

    @classmethod
    def by_destination(cls, destinations: torch.Tensor, peers: int, capacity: int) -> FixedRoute:
        return cls(slots_by_destination(destinations, peers, capacity), peers, capacity)

    def forward(self, rows: torch.Tensor, fill: float | int = 0) -> torch.Tensor:
        """rows: (n, ...) in any order. Returns the (peers * capacity, ...) slots peers filled for this instance,
        peer by peer; the slots they left empty hold `fill`."""
        buffer = rows.new_full((self.peers * self.capacity, *rows.shape[1:]), fill)
        return exchange(buffer.index_copy_(0, self.slots, rows))

    def backward(self, results: torch.Tensor) -> torch.Tensor:
        """results: one row per received slot, as `forward` returned them. Returns each sent row's result, in the
        order the rows were given to `forward`."""
        return exchange(results)[self.slots]
