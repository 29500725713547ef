"""One step's attention on one instance, with context parallelism: which rows go where, which pages each reads.

Built once a step and run by every layer:
- the home's query rows of a CP request go to each remote holder of a shard they attend, and their K, V rows go to
  the tail's holder when it is remote (rows a home sends, in order, are what the holder's metadata announced);
- each instance stores the K, V it owns, then attends its own rows over its local shards and the received rows over
  the shards they address, producing a partial (o, lse) per (query row, shard);
- partials of received rows go back, and the home merges every row's partials.
Requests wholly on their home take none of the routes; with no CP row anywhere in the group, no route runs at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nanocp import kernels
from nanocp.worker.comm import Route
from nanocp.worker.timing import StepTimer


@dataclass(frozen=True)
class Segment:
    """Query rows (indices into [home rows; received rows]) attending one shard's first kv_len tokens here."""

    rows: list[int]
    pages: list[int]
    kv_len: int
    causal: bool


@dataclass(frozen=True)
class CPRoutes:
    queries: Route  # home rows out to holders; partials back along the same route
    kv: Route  # K, V rows out to remote tails
    query_send: torch.Tensor  # home rows to send, ordered by holder
    kv_send: torch.Tensor  # home rows whose K, V go to a remote tail, ordered by holder
    kv_slots: torch.Tensor  # slots of the received K, V rows here
    partial_back: torch.Tensor  # for each received query row, its partial's index in this step's partials


class AttentionPlan:
    def __init__(
        self,
        home_rows: int,
        local_slots: torch.Tensor,
        segments: list[Segment],
        page_size: int,
        merge_index: torch.Tensor,
        routes: CPRoutes | None,
    ) -> None:
        """merge_index: (parts, home_rows) indices into [partials here; partials returned; one empty partial]."""
        self.home_rows = home_rows
        self.local_slots = local_slots
        self.routes = routes
        self.merge_index = merge_index
        device = local_slots.device
        self.groups: list[tuple[kernels.AttentionMetadata, torch.Tensor]] = []
        for causal in (True, False):
            chosen = [s for s in segments if s.causal == causal]
            if not chosen:
                continue
            qo, page_indptr, kv_lens, pages, rows = [0], [0], [], [], []
            for s in chosen:
                qo.append(qo[-1] + len(s.rows))
                page_indptr.append(page_indptr[-1] + len(s.pages))
                kv_lens.append(s.kv_len)
                pages.extend(s.pages)
                rows.extend(s.rows)
            tensor = torch.tensor(pages, dtype=torch.int64, device=device)
            meta = kernels.AttentionMetadata(qo, page_indptr, tensor, kv_lens, page_size, causal=causal)
            self.groups.append((meta, torch.tensor(rows, dtype=torch.int64, device=device)))

    def decode_metadata(self) -> kernels.AttentionMetadata | None:
        """The step's metadata when it is what a CUDA graph replays: one query row per request, in row order, over
        pages held here, with no route; otherwise None."""
        if self.routes is not None or len(self.groups) != 1:
            return None
        meta, _ = self.groups[0]
        return meta if meta.qo_indptr == list(range(self.home_rows + 1)) else None

    def run(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        scale: float,
        timer: StepTimer,
    ) -> torch.Tensor:
        """q: (home rows, heads, dim); k, v: (home rows, kv heads, dim). Returns the attention output of the home
        rows."""
        routes = self.routes
        received = q[:0]
        if routes is not None:
            with timer.section("cp_route"):
                received = routes.queries.forward(q[routes.query_send])
                kv = routes.kv.forward(torch.stack((k, v), dim=1)[routes.kv_send])
        with timer.section("attention"):
            kernels.store_kv(k_cache, v_cache, k, v, self.local_slots)
            if routes is not None:
                kernels.store_kv(k_cache, v_cache, kv[:, 0], kv[:, 1], routes.kv_slots)
            queries = torch.cat((q, received))
            outputs, lses = [], []
            for meta, rows in self.groups:
                out, lse = kernels.paged_attention(queries[rows], k_cache, v_cache, meta, scale)
                outputs.append(out)
                lses.append(lse)
            heads, dim = q.shape[1:]
            outputs.append(q.new_zeros(0, heads, dim))
            lses.append(torch.zeros(0, heads, dtype=torch.float32, device=q.device))
        if routes is not None:
            with timer.section("cp_route"):
                # o and lse travel as one float32 row each: one collective instead of two.
                partials = torch.cat((torch.cat(outputs).float().flatten(1), torch.cat(lses)), dim=1)
                back = routes.queries.backward(partials[routes.partial_back])
                outputs.append(back[:, : heads * dim].view(-1, heads, dim).to(q.dtype))
                lses.append(back[:, heads * dim :])
        with timer.section("merge"):
            outputs.append(q.new_zeros(1, heads, dim))  # the empty partial: o = 0, lse = -inf
            lses.append(torch.full((1, heads), float("-inf"), device=q.device))
            all_outputs, all_lses = torch.cat(outputs), torch.cat(lses)
            if self.merge_index.shape[0] == 1:  # one partial per row: it is the result
                return all_outputs[self.merge_index[0]]
            merged, _ = kernels.merge_states(all_outputs[self.merge_index], all_lses[self.merge_index])
            return merged
