"""The one communication primitive of a decode group: route rows to peer instances, and back, by per-peer counts.

The CP routes (query rows out, K, V to remote tails, partials back) and the MoE dispatch and combine all use it. It
runs over torch.distributed (all_to_all_single with splits): gloo between CPU processes, NCCL between GPUs. A route
takes its sizes from the host: the CP routes' from the step plan, which the step's metadata exchange (on the control
group) told every holder before the step; the MoE route's from `exchange_counts`, the one count that only the device
knows. Without an initialised process group (a lone instance) a route is the identity and issues no collective.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


def grouped() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


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


def exchange_counts(send_counts: torch.Tensor) -> tuple[Route, torch.Tensor]:
    """A route for device-made counts (MoE rows per peer and expert, (peers, columns)): a small all-to-all tells every
    peer what it will receive, then the host reads both sides' totals at once. This read is the one host sync left
    in a group's forward; it goes once routes of fixed capacity carry the counts on the device."""
    if not grouped():
        return Route(*[send_counts.sum(dim=1).tolist()] * 2), send_counts
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts.contiguous())
    send_rows, recv_rows = torch.stack((send_counts.sum(dim=1), recv_counts.sum(dim=1))).tolist()
    return Route(send_rows, recv_rows), recv_counts


def _move(rows: torch.Tensor, send: list[int], recv: list[int]) -> torch.Tensor:
    if not grouped():
        return rows
    out = rows.new_empty((sum(recv), *rows.shape[1:]))
    dist.all_to_all_single(out, rows.contiguous(), recv, send)
    return out
