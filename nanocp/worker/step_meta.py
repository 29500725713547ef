"""The metadata rows of a step's exchange: per (request, shard) a home's rows attend on a remote holder, the frees of
ended requests, and a holder's refusals of quotas it cannot commit: the types only (nanocp.worker.planner writes and
reads the rows), so that no code of this file runs on a token's path."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass


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
    REFUSED = 8  # 1: sent back to the home: this holder could not commit the shard's QUOTA (KEY, SHARD set)


MetaRow = list[int]  # len(Meta) integers


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


# Whether this instance holds the shard of a peer's metadata row (opening it: False when it cannot commit the quota).
Holds = Callable[[int, MetaRow], bool]
