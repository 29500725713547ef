"""A step's attention on one instance, with context parallelism: which rows go where, which pages each reads.

`AttentionPlan` is built once a step (by the planner) and read by every layer:
- the home's query rows of a CP request go to each remote holder of a shard they attend, and their K, V rows go to
  the tail's holder when it is remote (rows a home sends, in order, are what the holder's metadata announced);
- each instance stores the K, V it owns, then attends its own rows over its local shards and the received rows over
  the shards they address, producing a partial (o, lse) per (query row, shard);
- partials of received rows go back, and the home merges every row's partials.
Requests wholly on their home take none of the routes; with no CP row anywhere in the group, no route runs at all.

A decode step may instead be laid out at a graph bucket's fixed shapes (`StaticPlan`): what a CUDA graph captures,
with the CP routes at fixed slots of the routing layer.

`PagedAttention` is the one attention backend: bound to the KV cache, the scale and the step timer when the engine is
built, it runs whatever plan the step set.
"""

from __future__ import annotations

import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from nanocp import kernels
from nanocp.kernels import AttentionMetadata
from nanocp.worker import routing
from nanocp.worker.kv_cache import KVCache
from nanocp.worker.timing import StepTimer

if TYPE_CHECKING:
    from nanocp.kernels.flashinfer_attention import GraphDecode
    from nanocp.kernels.triton_decode import SplitDecode

    DecodeInGraph = GraphDecode | SplitDecode  # a graph bucket's decode attention: FlashInfer's, or Triton's


def to_device(values: Sequence[float] | Sequence[bool], dtype: torch.dtype, device: str | torch.device) -> torch.Tensor:
    """Host values as a tensor on `device`, without the host waiting for the device: a plain copy to CUDA from
    pageable memory synchronises the stream, so the host would stall until the step in flight ends (no overlap).
    Through pinned memory the copy is queued behind it instead; the caching host allocator keeps the pinned block
    until the copy has run."""
    host = torch.tensor(values, dtype=dtype)
    return _queued(host, device)


def int64_to_device(values: Iterable[int], device: str | torch.device) -> torch.Tensor:
    """to_device for integers through a packed array: torch.tensor converts a list one Python object at a time,
    which for the 32K page ids of 64 requests of 8K tokens was 2.3 ms of a step's host time
    (bench/results/profile_decode_gpu_after.json); packing first takes about half."""
    packed = array.array("q", values)
    host = torch.frombuffer(packed, dtype=torch.int64) if packed else torch.zeros(0, dtype=torch.int64)
    return _queued(host, device)


def _queued(host: torch.Tensor, device: str | torch.device) -> torch.Tensor:
    if torch.device(device).type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


@dataclass(frozen=True)
class Segment:
    """Query rows (indices into [home rows; received rows]) attending one shard's first kv_len tokens here."""

    rows: list[int]
    pages: list[int]
    kv_len: int
    causal: bool


@dataclass(frozen=True)
class CPRoutes:
    queries: routing.Route  # home rows out to holders; partials back along the same route
    kv: routing.Route  # K, V rows out to remote tails
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
        merge_index: torch.Tensor | None,
        routes: CPRoutes | None,
    ) -> None:
        """merge_index: (parts, home_rows) indices into [partials here; partials returned; one empty partial]; None
        when the segments are the home rows in order, one each, and nothing is routed (any step without CP): the
        attention of the rows is their output, with no gather, concatenation or merge (four copies of q's size a
        layer)."""
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
            meta = kernels.AttentionMetadata(
                qo, page_indptr, int64_to_device(pages, device), kv_lens, page_size, causal=causal
            )
            self.groups.append((meta, int64_to_device(rows, device)))


@dataclass(frozen=True)
class StaticRoutes:
    """A static step's CP routes, every row at a fixed slot: peer p's share of a route is slots p * rows ... p *
    rows + rows - 1 (a home sends each row at most once to a peer, so `rows` slots a peer always suffice)."""

    query_src: torch.Tensor  # (peers * rows,) the home row each query slot carries (padding slots: row 0, unread)
    kv_src: torch.Tensor  # (peers * rows,) the home row whose K, V each K, V slot carries
    kv_slots: torch.Tensor  # (peers * rows,) the KV slots here of what each received K, V slot carries (-1: padding)
    merge_index: torch.Tensor  # (peers, rows) each home row's partials: into [local; received; returned; empty]


@dataclass
class StaticPlan:
    """A decode step at a bucket's fixed shapes, what a CUDA graph captures: `rows` home rows (padding rows store
    nothing and attend one token of page 0), and with CP routes `peers * rows` received rows. Every attention row is
    one segment of its metadata, padding included, so a replay's tables are planned before it on the host.

    The home's rows attend their local shards while the query rows travel: two decode calls around the route."""

    rows: int
    local_slots: torch.Tensor  # (rows,) where each home row's K, V go here (-1: its tail is remote, or padding)
    local: AttentionMetadata | None  # one segment per home row (None: all padding, as at capture)
    routes: StaticRoutes | None = None
    received: AttentionMetadata | None = None  # one segment per receive slot
    decode: tuple[DecodeInGraph, DecodeInGraph | None] | None = None  # a graph bucket's decodes (CUDA)


class PagedAttention:
    def __init__(self, cache: KVCache, scale: float, timer: StepTimer) -> None:
        self.cache = cache
        self.scale = scale
        self.timer = timer
        self.plan: AttentionPlan | StaticPlan | None = None  # the step's, set before its forward
        # Static steps overlap the query route with the home's local attention; off, they wait for the route first
        # (what benchmarks compare).
        self.overlap = True

    def local_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Where the step's home rows' K, V go on this instance: (k cache, v cache, each row's slot, -1 for none).
        The caller writes them (kernels.qk_norm_rope's store: the same launch that makes them on CUDA)."""
        assert self.plan is not None, "a step sets its plan before its forward"
        return self.cache.k[layer], self.cache.v[layer], self.plan.local_slots

    def run(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: (home rows, heads, dim); k, v: (home rows, kv heads, dim), already stored here at local_kv's slots
        (they travel to the holders of remote tails). Returns the attention output of the home rows."""
        k_cache, v_cache = self.cache.k[layer], self.cache.v[layer]
        plan = self.plan
        if isinstance(plan, StaticPlan):
            return self._run_static(plan, q, k, v, k_cache, v_cache)
        assert plan is not None, "a step sets its plan before its forward"
        return self._run_plan(plan, q, k, v, k_cache, v_cache)

    def _run_static(
        self,
        plan: StaticPlan,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
    ) -> torch.Tensor:
        routes = plan.routes
        if routes is None:
            with self.timer.section("attention"):
                if plan.decode is not None:  # no partial to merge: the output alone
                    return plan.decode[0].output(q, k_cache, v_cache)
                return self._decode(plan, 0, q, k_cache, v_cache)[0]
        with self.timer.section("cp_route"):  # the query rows travel while the home attends its local shards
            queries = routing.start_exchange(q[routes.query_src])
            kv = routing.start_exchange(torch.stack((k, v), dim=1)[routes.kv_src])
            if not self.overlap:
                queries.wait()
                kv.wait()
        with self.timer.section("attention"):
            local_o, local_lse = self._decode(plan, 0, q, k_cache, v_cache)
        with self.timer.section("cp_route"):
            received_q, received_kv = queries.wait(), kv.wait()
        with self.timer.section("attention"):
            kernels.store_kv(k_cache, v_cache, received_kv[:, 0], received_kv[:, 1], routes.kv_slots)
            received_o, received_lse = self._decode(plan, 1, received_q, k_cache, v_cache)
        heads, dim = q.shape[1:]
        with self.timer.section("cp_route"):
            back = routing.exchange(torch.cat((received_o.float().flatten(1), received_lse), dim=1))
        with self.timer.section("merge"):
            empty_o, empty_lse = q.new_zeros(1, heads, dim), torch.full((1, heads), float("-inf"), device=q.device)
            outputs = torch.cat((local_o, received_o, back[:, : heads * dim].view(-1, heads, dim).to(q.dtype), empty_o))
            lses = torch.cat((local_lse, received_lse, back[:, heads * dim :], empty_lse))
            merged, _ = kernels.merge_states(outputs[routes.merge_index], lses[routes.merge_index])
            return merged

    def _decode(
        self, plan: StaticPlan, which: int, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One of the static step's decode calls (0: the home rows, 1: the received rows): (o, natural-log lse)."""
        if plan.decode is not None:
            decode = plan.decode[which]
            assert decode is not None, "a bucket with routes has a decode for received rows"
            return decode.run(q, k_cache, v_cache)
        meta = plan.local if which == 0 else plan.received
        assert meta is not None, "an eager static step is planned"
        return kernels.paged_attention(q, k_cache, v_cache, meta, self.scale)

    def _run_plan(
        self,
        plan: AttentionPlan,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
    ) -> torch.Tensor:
        routes, timer = plan.routes, self.timer
        if plan.merge_index is None:
            with timer.section("attention"):
                return kernels.paged_attention(q, k_cache, v_cache, plan.groups[0][0], self.scale, (k, v))[0]
        received = q[:0]
        if routes is not None:
            with timer.section("cp_route"):
                received = routes.queries.forward(q[routes.query_send])
                kv = routes.kv.forward(torch.stack((k, v), dim=1)[routes.kv_send])
        with timer.section("attention"):
            if routes is not None:
                kernels.store_kv(k_cache, v_cache, kv[:, 0], kv[:, 1], routes.kv_slots)
            queries = torch.cat((q, received))
            outputs, lses = [], []
            for meta, rows in plan.groups:
                out, lse = kernels.paged_attention(queries[rows], k_cache, v_cache, meta, self.scale)
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
            if plan.merge_index.shape[0] == 1:  # one partial per row: it is the result
                return all_outputs[plan.merge_index[0]]
            merged, _ = kernels.merge_states(all_outputs[plan.merge_index], all_lses[plan.merge_index])
            return merged
