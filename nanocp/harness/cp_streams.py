"""Requests the dcp policy splits over a group: the cost model in which splitting pays (scripts/token_path.py, the
migration runs), and the migration runs' eight streams, sent all at once with each chunk's arrival time, which
tests/test_group_migration.py checks and bench/migration_latency.py times.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from nanocp.client import AsyncClient, Chunk
from nanocp.router.cost import CostModel

# dcp splits only where its cost model predicts a faster group step: this one prices KV reads alone, so it does.
SPLIT_PAYS = CostModel(kv_token_ms=1.0, home_token_ms=0.0, routed_row_ms=0.0, fixed_ms=0.0, cp_step_ms=0.0)
LONG = list(range(1, 250))  # 249 tokens: two shards of 128 (the migration runs' dcp), one on each member of a group
# Greedy and seeded, short and long (CP degree 2); the generate keywords of each, the prompt among them.
REQUESTS: dict[str, dict[str, Any]] = {
    **{f"greedy-{i}": {"prompt": [1 + i, 2, 3], "temperature": 0.0} for i in range(2)},
    **{f"greedy-long-{i}": {"prompt": [7 + i, *LONG], "temperature": 0.0} for i in range(2)},
    **{f"seeded-{i}": {"prompt": [5, 6 + i], "temperature": 0.9, "top_k": 40, "seed": 10 + i} for i in range(2)},
    **{f"seeded-long-{i}": {"prompt": [9 + i, *LONG], "temperature": 1.0, "seed": 20 + i} for i in range(2)},
}


@dataclass
class Stream:
    started: float  # time.monotonic() when the request was sent
    chunks: list[Chunk] = field(default_factory=list)
    arrived: list[float] = field(default_factory=list)  # time.monotonic() of each chunk

    @property
    def tokens(self) -> list[int]:
        return [t for c in self.chunks for t in c.token_ids]

    @property
    def homes(self) -> list[str]:
        """Its home, then each one it moved to (a chunk carries a placement when the stream starts or moves)."""
        return [c.placement.home for c in self.chunks if c.placement is not None]

    def holder_not_home(self) -> str:
        """The instance that holds a shard of a CP request's KV but is not its home."""
        placement = self.chunks[0].placement
        assert placement is not None and len(placement.shards) == 2, "a long request is placed at CP degree 2"
        return next(s.instance for s in placement.shards if s.instance != placement.home)

    def moved_at(self) -> float | None:
        """When its first token from another home arrived (the chunk that carries its new placement)."""
        moves = (t for t, c in zip(self.arrived[1:], self.chunks[1:], strict=True) if c.placement is not None)
        return next(moves, None)


async def stream_requests(
    client: AsyncClient, max_tokens: int, disturb: Callable[[dict[str, Stream]], Awaitable[None]] | None = None
) -> dict[str, Stream]:
    """Streams every request of REQUESTS at once, `max_tokens` each (past EOS); `disturb(streams)` is awaited once
    every stream has its first token."""
    streams: dict[str, Stream] = {}
    started = {name: asyncio.Event() for name in REQUESTS}

    async def one(name: str) -> None:
        kwargs = dict(REQUESTS[name])
        stream = streams[name] = Stream(time.monotonic())
        async for chunk in client.generate(kwargs.pop("prompt"), max_tokens=max_tokens, ignore_eos=True, **kwargs):
            stream.chunks.append(chunk)
            stream.arrived.append(time.monotonic())
            started[name].set()

    tasks = [asyncio.create_task(one(name)) for name in REQUESTS]
    if disturb is not None:
        await asyncio.gather(*(e.wait() for e in started.values()))
        await disturb(streams)
    await asyncio.gather(*tasks)
    return streams
