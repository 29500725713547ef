"""What a home tells a remote holder of a request's shard each step: a metadata row of integers, one per (request,
shard) its rows attend there, or a free of an ended request's shards."""

from __future__ import annotations

import enum
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

    def meta(self) -> MetaRow:
        return [self.key, self.shard, self.quota, self.rows, self.kv_len, int(self.tail), int(self.tail), 0]


def free_row(key: int) -> MetaRow:
    return [key, 0, 0, 0, 0, 0, 0, 1]
