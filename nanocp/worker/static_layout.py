"""Lays a decode step out at a graph bucket's fixed shapes: the `StaticPlan` a CUDA graph replays (or a CPU step
runs eagerly, to test the same layout).

Home row r is the step's r-th decode; rows past the step's decodes are padding. With CP routes, the i-th query row
this home sends to peer p takes slot p * rows + i of the query route (and its K, V, when p holds the tail, the next
slot of p's share of the K, V route); at a holder, the i-th metadata row from peer p is receive slot p * rows + i.
Every attention row is one segment of its decode's metadata; a padding row attends one token of page 0.
"""

from __future__ import annotations

import torch

from nanocp.kernels import AttentionMetadata
from nanocp.worker.attention import StaticPlan, StaticRoutes
from nanocp.worker.shards import ShardStore
from nanocp.worker.step_meta import Attend, MetaRow

PAD_PAGE = 0


def static_plan(
    attends: list[Attend],
    attending: list[list[MetaRow]],
    store: ShardStore,
    rank: int,
    peers: int,
    rows: int,
    cp_routes: bool,
    device: str,
) -> StaticPlan:
    """attends: the home's, in row order (one row a decode); attending: the metadata rows from each peer."""
    local = [_padding()] * rows
    local_slots = [-1] * rows
    for a in attends:
        if a.holder != rank:
            continue
        store.open(a.key, a.shard, a.quota)
        local[a.first_row] = (store.pages_for(a.key, a.shard, a.kv_len), a.kv_len)
        if a.tail:
            local_slots[a.first_row] = store.slots(a.key, a.shard, a.kv_len - 1, 1)[0]
    plan = StaticPlan(rows, _tensor(local_slots, device), _metadata(local, store.page_size, device))
    if not cp_routes:
        return plan
    received = [_padding()] * (peers * rows)
    kv_slots = [-1] * (peers * rows)
    for peer, meta_rows in enumerate(attending):
        appended = 0
        for i, (key, shard, quota, _, kv_len, appends, _, _) in enumerate(meta_rows):
            store.open(key, shard, quota)
            received[peer * rows + i] = (store.pages_for(key, shard, kv_len), kv_len)
            if appends:
                kv_slots[peer * rows + appended] = store.slots(key, shard, kv_len - 1, 1)[0]
                appended += 1
    plan.routes = _routes(attends, rank, peers, rows, kv_slots, device)
    plan.received = _metadata(received, store.page_size, device)
    return plan


def _routes(attends: list[Attend], rank: int, peers: int, rows: int, kv_slots: list[int], device: str) -> StaticRoutes:
    query_src, kv_src = [0] * (peers * rows), [0] * (peers * rows)
    returned, empty = rows + peers * rows, rows + 2 * peers * rows  # offsets in [local; received; returned; empty]
    parts: list[list[int]] = [[r] for r in range(rows)]  # a row attends its local shard, or it is padding...
    has_local = {a.first_row for a in attends if a.holder == rank}
    for r in range(rows):
        if r not in has_local and any(a.first_row == r for a in attends):
            parts[r] = []  # ...unless its shards are all elsewhere
    sent, sent_kv = [0] * peers, [0] * peers
    for a in sorted((a for a in attends if a.holder != rank), key=lambda a: a.holder):
        slot = a.holder * rows + sent[a.holder]
        sent[a.holder] += 1
        query_src[slot] = a.first_row
        parts[a.first_row].append(returned + slot)
        if a.tail:
            kv_src[a.holder * rows + sent_kv[a.holder]] = a.first_row
            sent_kv[a.holder] += 1
    merge = [[p[i] if i < len(p) else empty for p in parts] for i in range(peers)]
    return StaticRoutes(
        _tensor(query_src, device),
        _tensor(kv_src, device),
        _tensor(kv_slots, device),
        _tensor([i for part in merge for i in part], device).view(peers, rows),
    )


def _padding() -> tuple[list[int], int]:
    return [PAD_PAGE], 1


def _metadata(segments: list[tuple[list[int], int]], page_size: int, device: str) -> AttentionMetadata:
    """One single-row segment per attention row."""
    page_indptr = [0]
    for pages, _ in segments:
        page_indptr.append(page_indptr[-1] + len(pages))
    indices = _tensor([p for pages, _ in segments for p in pages], device)
    qo_indptr = list(range(len(segments) + 1))
    return AttentionMetadata(qo_indptr, page_indptr, indices, [n for _, n in segments], page_size, causal=False)


def _tensor(values: list[int], device: str) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64, device=device)
