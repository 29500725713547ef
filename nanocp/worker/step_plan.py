"""Turns a step's chunks into what the model reads: token ids, positions, and the attention plan.

In two halves around the step's metadata exchange. `outgoing` (at the home) lists, per scheduled chunk, the shards
its query rows attend and announces the remote ones to their holders as metadata rows. `build` (at every instance)
opens the shards it is told about, takes their pages, and lays out the attention segments, KV slots and routes.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from nanocp.worker.attention_plan import AttentionPlan, CPRoutes, Segment
from nanocp.worker.comm import Route
from nanocp.worker.model import StepContext
from nanocp.worker.scheduler import Chunk
from nanocp.worker.shards import ShardStore, shard_ends
from nanocp.worker.timing import StepTimer


class Meta(enum.IntEnum):
    """Columns of a metadata row, one per (request, shard) a home's rows attend on a remote holder this step."""

    KEY = 0
    SHARD = 1
    QUOTA = 2
    ROWS = 3  # query rows sent
    KV_LEN = 4  # shard tokens attended, after this step's K, V are stored
    APPENDS = 5  # 1 when the rows' K, V are sent too (the shard is their tail)
    CAUSAL = 6
    FREE = 7  # 1: the request ended, free its shards (the other columns are unused)


@dataclass(frozen=True)
class Attend:
    """A chunk's query rows attending one of its request's shards."""

    first_row: int  # the chunk's first row among this step's home rows
    rows: int
    key: int
    shard: int
    quota: int
    kv_len: int
    tail: bool  # the rows' K, V go here, and the mask is causal
    holder: int

    def meta(self) -> list[int]:
        return [self.key, self.shard, self.quota, self.rows, self.kv_len, int(self.tail), int(self.tail), 0]


@dataclass(frozen=True)
class Outgoing:
    attends: list[Attend]  # all of them, local ones too, in chunk order
    meta: torch.Tensor  # (rows, len(Meta)) ordered by destination
    meta_counts: torch.Tensor  # (peers, 1)
    rank: int

    @property
    def remote_rows(self) -> int:
        """Query rows this home sends out this step."""
        return sum(a.rows for a in self.attends if a.holder != self.rank)


def outgoing(chunks: list[Chunk], rank: int, size: int, page_size: int, frees: dict[int, list[int]]) -> Outgoing:
    """The home's view: what each chunk attends, and the metadata rows for remote holders (frees first)."""
    attends: list[Attend] = []
    row = 0
    for chunk in chunks:
        r = chunk.request
        start, end = r.num_computed, r.num_computed + chunk.num_tokens
        ends = shard_ends(r.shards, page_size)
        tail = r.shard_at(start)
        for j in range(tail + 1):
            shard = r.shards[j]
            kv_len = (end if j == tail else ends[j]) - shard.start
            attends.append(Attend(row, chunk.num_tokens, r.key, j, shard.page_quota, kv_len, j == tail, shard.holder))
        row += chunk.num_tokens
    per_peer: list[list[list[int]]] = [[] for _ in range(size)]
    for peer, keys in frees.items():
        per_peer[peer].extend([key, 0, 0, 0, 0, 0, 0, 1] for key in keys)
    for a in attends:
        if a.holder != rank:
            per_peer[a.holder].append(a.meta())
    flat = [m for rows in per_peer for m in rows]
    meta = torch.tensor(flat, dtype=torch.int64).view(-1, len(Meta))
    counts = torch.tensor([[len(rows)] for rows in per_peer], dtype=torch.int64)
    return Outgoing(attends, meta, counts, rank)


@dataclass
class StepInputs:
    token_ids: torch.Tensor
    context: StepContext
    plan: AttentionPlan  # the context's attention
    sample_rows: torch.Tensor  # rows whose hidden state gives a next-token distribution
    sampling_chunks: list[Chunk]
    kv_tokens_read: int  # by this instance's attention, per layer
    rows_routed: int  # query rows sent out plus received


def build(
    chunks: list[Chunk],
    out: Outgoing,
    incoming: torch.Tensor,
    incoming_counts: list[int],
    store: ShardStore,
    rank: int,
    cp_routes: bool,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    device: str,
    timer: StepTimer,
) -> StepInputs:
    """incoming: the metadata rows peers sent here, ordered by source (incoming_counts rows from each).

    cp_routes: whether any instance of the group routes query rows this step (then every instance runs the routes,
    with zero rows where it has none, so the collectives match).
    """
    page_size = store.page_size

    def tensor(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=device)

    # Requests that ended at their homes: free their shards here before anything else.
    for row in incoming[incoming[:, Meta.FREE] == 1].tolist():
        store.free(row[Meta.KEY])
    attending = incoming[incoming[:, Meta.FREE] == 0]

    token_ids: list[int] = []
    positions: list[int] = []
    sample_rows: list[int] = []
    for chunk in chunks:
        r = chunk.request
        token_ids.extend(r.token_slice(r.num_computed, r.num_computed + chunk.num_tokens))
        positions.extend(range(r.num_computed, r.num_computed + chunk.num_tokens))
        if chunk.samples:
            sample_rows.append(len(token_ids) - 1)
    home_rows = len(token_ids)

    segments: list[Segment] = []
    local_slots = [-1] * home_rows  # rows whose tail is remote store nothing here
    parts: list[list[int]] = [[] for _ in range(home_rows)]  # each home row's partials, by index

    # Local attends: the home's rows over shards held here.
    query_send: list[int] = []
    kv_send: list[int] = []
    remote_attends = sorted((a for a in out.attends if a.holder != rank), key=lambda a: a.holder)
    for a in out.attends:
        if a.holder != rank:
            continue
        store.open(a.key, a.shard, a.quota)
        pages = store.pages_for(a.key, a.shard, a.kv_len)
        if a.tail:
            slots = store.slots(a.key, a.shard, a.kv_len - a.rows, a.rows)
            local_slots[a.first_row : a.first_row + a.rows] = slots
        segments.append(Segment(list(range(a.first_row, a.first_row + a.rows)), pages, a.kv_len, a.tail))
    for a in remote_attends:
        query_send.extend(range(a.first_row, a.first_row + a.rows))
        if a.tail:
            kv_send.extend(range(a.first_row, a.first_row + a.rows))

    # Received attends: peers' rows over shards held here, in the order the rows arrive.
    received_row = home_rows
    kv_slots: list[int] = []
    received_segments: list[int] = []  # segment index of each received row
    for key, shard, quota, rows, kv_len, appends, causal, _ in attending.tolist():
        store.open(key, shard, quota)
        pages = store.pages_for(key, shard, kv_len)
        if appends:
            kv_slots.extend(store.slots(key, shard, kv_len - rows, rows))
        received_segments.extend([len(segments)] * rows)
        segments.append(Segment(list(range(received_row, received_row + rows)), pages, kv_len, bool(causal)))
        received_row += rows

    # Number the partials as the plan will produce them: causal segments first, then the rest.
    order = [i for i, s in enumerate(segments) if s.causal] + [i for i, s in enumerate(segments) if not s.causal]
    first_partial: dict[int, int] = {}
    partial = 0
    for i in order:
        first_partial[i] = partial
        partial += len(segments[i].rows)
    for i, s in enumerate(segments):
        for offset, row in enumerate(s.rows):
            if row < home_rows:
                parts[row].append(first_partial[i] + offset)
    partial_back = [
        first_partial[seg] + row - segments[seg].rows[0]
        for seg, row in zip(received_segments, range(home_rows, received_row), strict=True)
    ]
    # Partials of the home's rows sent out come back in the order the rows were sent.
    for j, row in enumerate(query_send):
        parts[row].append(partial + j)
    empty = partial + len(query_send)
    width = max((len(p) for p in parts), default=1) or 1
    merge_index = tensor([p[i] if i < len(p) else empty for i in range(width) for p in parts]).view(width, -1)

    routes = None
    if cp_routes:
        sent_rows = [0] * len(incoming_counts)
        sent_kv = [0] * len(incoming_counts)
        for a in remote_attends:
            sent_rows[a.holder] += a.rows
            sent_kv[a.holder] += a.rows if a.tail else 0
        got_rows, got_kv, offset = [], [], 0
        for count in incoming_counts:
            rows_from = incoming[offset : offset + count]
            live = rows_from[rows_from[:, Meta.FREE] == 0]
            got_rows.append(int(live[:, Meta.ROWS].sum()))
            got_kv.append(int((live[:, Meta.ROWS] * live[:, Meta.APPENDS]).sum()))
            offset += count
        routes = CPRoutes(
            queries=Route(_column(sent_rows), _column(got_rows)),
            kv=Route(_column(sent_kv), _column(got_kv)),
            query_send=tensor(query_send),
            kv_send=tensor(kv_send),
            kv_slots=tensor(kv_slots),
            partial_back=tensor(partial_back),
        )
    plan = AttentionPlan(home_rows, tensor(local_slots), segments, page_size, merge_index, routes)
    context = StepContext(tensor(positions), plan, k_cache, v_cache, timer)
    return StepInputs(
        tensor(token_ids),
        context,
        plan,
        tensor(sample_rows),
        [c for c in chunks if c.samples],
        kv_tokens_read=sum(s.kv_len for s in segments),
        rows_routed=len(query_send) + received_row - home_rows,
    )


def _column(counts: list[int]) -> torch.Tensor:
    return torch.tensor(counts, dtype=torch.int64).view(-1, 1)
