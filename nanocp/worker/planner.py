"""Turns a step's chunks into what the model reads: token ids, positions, the attention plan and the sampling rows.

In two halves around the step's exchange. `outgoing` (at the home) lists, per scheduled chunk, the shards its query
rows attend and announces the remote ones to their holders as metadata rows. `build` (at every instance) opens the
shards it is told about, takes their pages, and lays out the attention segments, KV slots and routes. Every size a
route needs comes from these host-side lists: nothing is read back from the device.

A decode step of the whole group may instead be laid out at a graph bucket's fixed shapes (`static_plan`): the
`StaticPlan` a CUDA graph replays, or a CPU step runs eagerly to test the same layout.

Home row r is the step's r-th decode; rows past the step's decodes are padding. With CP routes, the i-th query row
this home sends to peer p takes slot p * rows + i of the query route (and its K, V, when p holds the tail, the next
slot of p's share of the K, V route); at a holder, the i-th metadata row from peer p is receive slot p * rows + i.
Every attention row is one segment of its decode's metadata; a padding row attends one token of page 0.

A holder that cannot commit a shard's quota (a placement the router did not make: its ledger never over-commits)
opens nothing for it: the rows attend nothing there and their K, V are stored nowhere, and at the next step the
holder sends the home a refusal row, so the home ends that request alone (RESOURCE_EXHAUSTED) before reading any token
the missing shard touched.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from nanocp.placement import shard_ends
from nanocp.worker.attention import (
    AttentionPlan,
    CPRoutes,
    Segment,
    StaticPlan,
    int64_to_device,
)
from nanocp.worker.kv_cache import OverCommit, ShardStore
from nanocp.worker.request import SamplingParams
from nanocp.worker.routing import Route
from nanocp.worker.scheduler import Chunk
from nanocp.worker.static_layout import static_plan
from nanocp.worker.step_meta import Attend, Meta, MetaRow

log = logging.getLogger(__name__)


def announce(a: Attend) -> MetaRow:
    """The metadata row telling a remote holder of an attend."""
    return [a.key, a.shard, a.quota, a.rows, a.kv_len, int(a.tail), int(a.tail), 0, 0]


def free_row(key: int) -> MetaRow:
    return [key, 0, 0, 0, 0, 0, 0, 1, 0]


def refusal_row(key: int, shard: int, quota: int) -> MetaRow:
    return [key, shard, quota, 0, 0, 0, 0, 0, 1]


@dataclass(frozen=True)
class Outgoing:
    attends: list[Attend]  # all of them, local ones too, in chunk order
    meta: list[list[MetaRow]]  # per peer, the rows it is told (frees and refusals first)
    rank: int
    opens_remote: bool = False  # some row asks a holder for a quota it was not asked before

    @property
    def remote(self) -> list[Attend]:
        """The attends on other holders, ordered by holder: the order their rows are sent in."""
        return sorted((a for a in self.attends if a.holder != self.rank), key=lambda a: a.holder)


@dataclass(frozen=True)
class SamplingRows:
    """The settings of a step's sampling rows, in row order."""

    params: list[SamplingParams]
    seeds: list[int]  # per row, the request's seed (its own, or one the engine drew)
    draws: list[int]  # per row, the index of the token being drawn (Request.token_index)

    @property
    def all_greedy(self) -> bool:
        return all(p.greedy for p in self.params)


@dataclass
class StepInputs:
    token_ids: torch.Tensor
    positions: torch.Tensor  # of each token in its request
    plan: AttentionPlan | StaticPlan
    sample_rows: torch.Tensor  # rows whose hidden state gives a next-token distribution
    sampling_chunks: list[Chunk]
    sampling: SamplingRows
    kv_tokens_read: int  # by this instance's attention, per layer
    rows_routed: int  # query rows sent out plus received
    group_max_tokens: int = 0  # the most home tokens of any member this step (its own, alone)
    refused: list[tuple[int, MetaRow]] = field(default_factory=list)  # (holder, row): shards a holder refused
    awaits_holders: bool = False  # a holder first sees a quota: a refusal of it comes with the next step


class StepPlanner:
    def __init__(self, store: ShardStore, rank: int, size: int, device: str) -> None:
        self.store = store
        self.rank = rank
        self.size = size
        self.device = device
        self._asked: dict[int, dict[int, int]] = {}  # home side: request key -> shard -> quota announced to its holder
        self._refusals: dict[int, list[MetaRow]] = {}  # holder side: home rank -> refusals to send at the next step

    @property
    def has_refusals(self) -> bool:
        return bool(self._refusals)

    def outgoing(self, chunks: list[Chunk], frees: dict[int, list[int]]) -> Outgoing:
        """The home's view: what each chunk attends, and the metadata rows for remote holders (frees and the
        refusals of the last step first)."""
        attends: list[Attend] = []
        row = 0
        for chunk in chunks:
            r = chunk.request
            start, end = r.num_computed, r.num_computed + chunk.num_tokens
            ends = shard_ends(r.shards, self.store.page_size)
            tail = r.shard_at(start)
            for j, shard in enumerate(r.shards[: tail + 1]):
                kv_len = (end if j == tail else ends[j]) - shard.start
                attends.append(Attend(row, chunk.num_tokens, r.key, j, shard.page_quota, kv_len, j == tail, shard.rank))
            row += chunk.num_tokens
        meta: list[list[MetaRow]] = [[free_row(key) for key in frees.get(peer, [])] for peer in range(self.size)]
        for keys in frees.values():
            for key in keys:
                self._asked.pop(key, None)
        for peer, refusals in self._refusals.items():
            meta[peer].extend(refusals)
        self._refusals = {}
        opens = False
        for a in attends:
            if a.holder != self.rank:
                meta[a.holder].append(announce(a))
                asked = self._asked.setdefault(a.key, {})
                before = asked.get(a.shard, 0)
                opens |= a.quota > before
                asked[a.shard] = max(a.quota, before)
        return Outgoing(attends, meta, self.rank, opens)

    def build(
        self,
        chunks: list[Chunk],
        out: Outgoing,
        incoming: list[list[MetaRow]],
        cp_routes: bool,
        group_max_tokens: int = 0,
        static_rows: int | None = None,
    ) -> StepInputs:
        """incoming: the metadata rows each peer sent here. cp_routes: whether any instance of the group routes query
        rows this step (then every instance runs the routes, with zero rows where it has none, so the collectives
        match). group_max_tokens: the most home tokens of any member this step (what sizes fixed-capacity routes).
        static_rows: lay the step out at this graph bucket's shapes (a decode-only step of the whole group)."""
        refused = []
        for peer, rows in enumerate(incoming):  # requests that ended at their homes: free their shards here first
            for row in rows:
                if row[Meta.FREE]:
                    self.store.free(row[Meta.KEY])
                elif row[Meta.REFUSED]:
                    refused.append((peer, row))
        attending = [[row for row in rows if not (row[Meta.FREE] or row[Meta.REFUSED])] for rows in incoming]
        token_ids, positions, sample_rows = _home_rows(chunks)
        home_rows = len(token_ids)
        plan: AttentionPlan | StaticPlan
        if static_rows is None:
            plan = self._dynamic_plan(out, attending, home_rows, cp_routes)
        else:
            plan = static_plan(
                out.attends,
                attending,
                self.store,
                self._holds,
                self.rank,
                self.size,
                static_rows,
                cp_routes,
                self.device,
            )
            token_ids += [0] * (static_rows - home_rows)  # padding rows: token 0 at position 0, their output dropped
            positions += [0] * (static_rows - home_rows)
        sampling_chunks = [c for c in chunks if c.samples]
        requests = [c.request for c in sampling_chunks]
        local_kv = sum(a.kv_len for a in out.attends if a.holder == self.rank)
        return StepInputs(
            int64_to_device(token_ids, self.device),
            int64_to_device(positions, self.device),
            plan,
            int64_to_device(sample_rows, self.device),
            sampling_chunks,
            SamplingRows([r.params for r in requests], [r.seed for r in requests], [r.token_index for r in requests]),
            kv_tokens_read=local_kv + sum(row[Meta.KV_LEN] for rows in attending for row in rows),
            rows_routed=sum(a.rows for a in out.remote) + sum(row[Meta.ROWS] for rows in attending for row in rows),
            group_max_tokens=max(group_max_tokens, home_rows),
            refused=refused,
            awaits_holders=out.opens_remote,
        )

    def _holds(self, peer: int, row: MetaRow) -> bool:
        """Opens the shard of a peer's metadata row here; a quota beyond this pool's uncommitted pages is refused
        (told to the home at the next step) and nothing is opened."""
        key, shard, quota = row[Meta.KEY], row[Meta.SHARD], row[Meta.QUOTA]
        try:
            self.store.open(key, shard, quota)
        except OverCommit as refusal:
            log.warning("refused shard %d of request %d from rank %d: %s", shard, key, peer, refusal)
            self._refusals.setdefault(peer, []).append(refusal_row(key, shard, quota))
            return False
        return True

    def _dynamic_plan(
        self, out: Outgoing, attending: list[list[MetaRow]], home_rows: int, cp_routes: bool
    ) -> AttentionPlan:
        """Any step: segments of any length, routes sized to exactly the rows that travel."""
        local_slots = [-1] * home_rows  # rows whose tail is remote store nothing here
        segments = self._local_segments(out, local_slots)
        kv_slots: list[int] = []
        received_segments = self._received_segments(attending, home_rows, segments, kv_slots)
        if not cp_routes and _rows_in_order(segments, home_rows):
            return AttentionPlan(
                home_rows, int64_to_device(local_slots, self.device), segments, self.store.page_size, None, None
            )
        query_send = [r for a in out.remote for r in range(a.first_row, a.first_row + a.rows)]
        kv_send = [r for a in out.remote if a.tail for r in range(a.first_row, a.first_row + a.rows)]
        merge_index, partial_back = _merge_layout(segments, home_rows, received_segments, query_send)
        routes = None
        if cp_routes:
            routes = CPRoutes(
                queries=Route(*self._row_counts(out, attending, tails_only=False)),
                kv=Route(*self._row_counts(out, attending, tails_only=True)),
                query_send=int64_to_device(query_send, self.device),
                kv_send=int64_to_device(kv_send, self.device),
                kv_slots=int64_to_device(kv_slots, self.device),
                partial_back=int64_to_device(partial_back, self.device),
            )
        merge = int64_to_device([i for part in merge_index for i in part], self.device).view(
            len(merge_index), home_rows
        )
        return AttentionPlan(
            home_rows, int64_to_device(local_slots, self.device), segments, self.store.page_size, merge, routes
        )

    def _local_segments(self, out: Outgoing, local_slots: list[int]) -> list[Segment]:
        """The home's rows over shards held here; the slots of the rows whose tail is here go into local_slots."""
        segments = []
        for a in out.attends:
            if a.holder != self.rank:
                continue
            self.store.open(a.key, a.shard, a.quota)
            pages = self.store.pages_for(a.key, a.shard, a.kv_len)
            if a.tail:
                local_slots[a.first_row : a.first_row + a.rows] = self.store.slots(
                    a.key, a.shard, a.kv_len - a.rows, a.rows
                )
            segments.append(Segment(list(range(a.first_row, a.first_row + a.rows)), pages, a.kv_len, a.tail))
        return segments

    def _received_segments(
        self, attending: list[list[MetaRow]], home_rows: int, segments: list[Segment], kv_slots: list[int]
    ) -> list[int]:
        """Appends the segments of peers' rows over shards held here, in the order the rows arrive, and the slots of
        the K, V rows that come with them; returns the segment index of each received row."""
        received_row = home_rows
        received_segments: list[int] = []
        for peer, meta_rows in enumerate(attending):
            for row in meta_rows:
                key, shard, _, rows, kv_len, appends, causal = row[: Meta.FREE]
                if not self._holds(peer, row):  # refused: the rows attend nothing here, their K, V go nowhere
                    kv_len = 0
                    kv_slots.extend([-1] * (rows if appends else 0))
                    pages = []
                else:
                    pages = self.store.pages_for(key, shard, kv_len)
                    if appends:
                        kv_slots.extend(self.store.slots(key, shard, kv_len - rows, rows))
                received_segments.extend([len(segments)] * rows)
                segments.append(Segment(list(range(received_row, received_row + rows)), pages, kv_len, bool(causal)))
                received_row += rows
        return received_segments

    def _row_counts(
        self, out: Outgoing, attending: list[list[MetaRow]], tails_only: bool
    ) -> tuple[list[int], list[int]]:
        """Query rows (or, tails_only, K, V rows) this instance sends each peer and receives from each."""
        sent = [0] * self.size
        for a in out.remote:
            sent[a.holder] += a.rows if a.tail or not tails_only else 0
        got = [sum(row[Meta.ROWS] * (row[Meta.APPENDS] if tails_only else 1) for row in rows) for rows in attending]
        return sent, got


def _home_rows(chunks: list[Chunk]) -> tuple[list[int], list[int], list[int]]:
    """The step's token ids and positions, chunk by chunk, and the rows that sample (each chunk's last, if it does)."""
    token_ids: list[int] = []
    positions: list[int] = []
    sample_rows: list[int] = []
    for chunk in chunks:
        r = chunk.request
        token_ids.extend(r.token_slice(r.num_computed, r.num_computed + chunk.num_tokens))
        positions.extend(range(r.num_computed, r.num_computed + chunk.num_tokens))
        if chunk.samples:
            sample_rows.append(len(token_ids) - 1)
    return token_ids, positions, sample_rows


def _rows_in_order(segments: list[Segment], home_rows: int) -> bool:
    """Whether the segments are the home rows in order, one each, all causal or none (so one attention call
    produces the rows' partials in row order). An instance with no rows has no segment (it runs no attention)."""
    rows = [r for s in segments for r in s.rows]
    return bool(segments) and len({s.causal for s in segments}) == 1 and rows == list(range(home_rows))


def _merge_layout(
    segments: list[Segment], home_rows: int, received_segments: list[int], query_send: list[int]
) -> tuple[list[list[int]], list[int]]:
    """Which partials each home row merges, as (parts, home_rows) indices into [partials here; partials returned;
    one empty partial], and each received row's partial to send back.

    Partials are numbered as the plan produces them: causal segments first, then the rest; the partials of the
    home's rows sent out come back after them, in the order the rows were sent."""
    order = [i for i, s in enumerate(segments) if s.causal] + [i for i, s in enumerate(segments) if not s.causal]
    first_partial: dict[int, int] = {}
    partial = 0
    for i in order:
        first_partial[i] = partial
        partial += len(segments[i].rows)
    parts: list[list[int]] = [[] for _ in range(home_rows)]
    for i, s in enumerate(segments):
        for offset, row in enumerate(s.rows):
            if row < home_rows:
                parts[row].append(first_partial[i] + offset)
    partial_back = [
        first_partial[seg] + row - segments[seg].rows[0]
        for seg, row in zip(received_segments, range(home_rows, home_rows + len(received_segments)), strict=True)
    ]
    for j, row in enumerate(query_send):
        parts[row].append(partial + j)
    empty = partial + len(query_send)
    width = max((len(p) for p in parts), default=1) or 1
    return [[p[i] if i < len(p) else empty for p in parts] for i in range(width)], partial_back
