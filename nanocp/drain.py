"""How long a shutting-down server waits: until it is idle (a worker: its whole group), or its grace period ends."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


async def wait_idle(idle: Callable[[], bool], failed: Callable[[], bool], grace_s: float, settle_s: float) -> bool:
    """True once `idle()` has held for `settle_s` (a worker: a peer's new work reaches its loop a step later), or
    when `failed()` turned true while idle (a drained peer left the group first: nothing was lost); False when
    `grace_s` passed first or it failed with work in it."""
    deadline = time.monotonic() + grace_s
    idle_since: float | None = None
    while time.monotonic() < deadline:
        now = time.monotonic()
        if failed():
            return idle_since is not None
        idle_since = (idle_since or now) if idle() else None
        if idle_since is not None and now - idle_since >= settle_s:
            return True
        await asyncio.sleep(0.05)
    return False
