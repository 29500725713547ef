"""A decode step of the whole group at a graph bucket's fixed shapes: the `StaticPlan` a CUDA graph replays (or a CPU
step runs eagerly to test the same layout). nanocp.worker.planner's docstring describes the slots."""

from __future__ import annotations

import itertools

from nanocp.kernels import AttentionMetadata
from nanocp.kernels.flashinfer_attention import PAD_PAGE
from nanocp.worker.attention import StaticPlan, StaticRoutes, int64_to_device
from nanocp.worker.kv_cache import ShardStore
from nanocp.worker.step_meta import Attend, Holds, Meta, MetaRow


def static_plan(
    attends: list[Attend],
    attending: list[list[MetaRow]],
    store: ShardStore,
    holds: Holds,
    rank: int,
    peers: int,
    rows: int,
    cp_routes: bool,
    device: str,
) -> StaticPlan:
    """attends: the home's, in row order (one row a decode); attending: the metadata rows from each peer, whose
    shards `holds` opens (a refused one's row stays padding, its K, V stored nowhere)."""
    local = [_padding()] * rows
    local_slots = [-1] * rows
    for a in attends:
        if a.holder != rank:
            continue
        store.open(a.key, a.shard, a.quota)
        local[a.first_row] = (store.pages_for(a.key, a.shard, a.kv_len), a.kv_len)
        if a.tail:
            local_slots[a.first_row] = store.slots(a.key, a.shard, a.kv_len - 1, 1)[0]
    plan = StaticPlan(rows, int64_to_device(local_slots, device), _metadata(local, store.page_size, device))
    if not cp_routes:
        return plan
    received = [_padding()] * (peers * rows)
    kv_slots = [-1] * (peers * rows)
    for peer, meta_rows in enumerate(attending):
        appended = 0
        for i, row in enumerate(meta_rows):
            key, shard, kv_len, appends = row[Meta.KEY], row[Meta.SHARD], row[Meta.KV_LEN], row[Meta.APPENDS]
            held = holds(peer, row)
            if held:
                received[peer * rows + i] = (store.pages_for(key, shard, kv_len), kv_len)
            if appends:  # the K, V rows arrive in order: a refused row's slot stays -1
                if held:
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
        int64_to_device(query_src, device),
        int64_to_device(kv_src, device),
        int64_to_device(kv_slots, device),
        int64_to_device([i for part in merge for i in part], device).view(peers, rows),
    )


def _padding() -> tuple[list[int], int]:
    return [PAD_PAGE], 1  # the page a graph's decode pads with: both layouts agree


def _metadata(segments: list[tuple[list[int], int]], page_size: int, device: str) -> AttentionMetadata:
    """One single-row segment per attention row."""
    page_indptr = [0]
    for pages, _ in segments:
        page_indptr.append(page_indptr[-1] + len(pages))
    indices = int64_to_device(itertools.chain.from_iterable(pages for pages, _ in segments), device)
    qo_indptr = list(range(len(segments) + 1))
    return AttentionMetadata(qo_indptr, page_indptr, indices, [n for _, n in segments], page_size, causal=False)
