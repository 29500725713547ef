"""The one communication primitive of a decode group: route rows to peer instances, and back, by per-peer counts.

MoE dispatch and combine use it; so will the attention partials of context parallelism. It runs over
torch.distributed (all_to_all_single with splits): gloo between CPU processes, NCCL between GPUs. Without an
initialised process group (a lone instance) a route is the identity and issues no collective.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
import torch.distributed as dist


def _grouped() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@dataclass(frozen=True)
class Route:
    """Who sends how many rows to whom, as seen from one instance; planned once and used both ways.

    Counts are (peers, columns) int64: the columns travel together, so one route can carry several counts per peer
    (per-expert counts for MoE). A peer's row count is the sum of its columns.
    """

    send_counts: torch.Tensor
    recv_counts: torch.Tensor

    @classmethod
    def plan(cls, send_counts: torch.Tensor) -> Route:
        """Tells every peer how many rows it will get from us and learns the same from them (a small collective)."""
        if not _grouped():
            return cls(send_counts, send_counts)
        recv = torch.empty_like(send_counts)
        dist.all_to_all_single(recv, send_counts.contiguous())
        return cls(send_counts, recv)

    @cached_property
    def send_rows(self) -> list[int]:
        return self.send_counts.sum(dim=1).tolist()

    @cached_property
    def recv_rows(self) -> list[int]:
        return self.recv_counts.sum(dim=1).tolist()

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        """rows: (sum(send_rows), ...) ordered by destination; returns what peers sent us, ordered by source."""
        return self._move(rows, self.send_rows, self.recv_rows)

    def backward(self, rows: torch.Tensor) -> torch.Tensor:
        """The way back: rows in the order `forward` returned them go home, arriving in the order they were sent."""
        return self._move(rows, self.recv_rows, self.send_rows)

    @staticmethod
    def _move(rows: torch.Tensor, send: list[int], recv: list[int]) -> torch.Tensor:
        if not _grouped():
            return rows
        out = rows.new_empty((sum(recv), *rows.shape[1:]))
        dist.all_to_all_single(out, rows.contiguous(), recv, send)
        return out
