"""Which decode group an instance belongs to, read without loading torch (the CLI parses it at start-up)."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class GroupSpec:
    rank: int = 0
    size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500

    @classmethod
    def from_env(cls) -> GroupSpec:
        env = os.environ
        return cls(
            rank=int(env.get("RANK", 0)),
            size=int(env.get("WORLD_SIZE", 1)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500)),
        )

    @property
    def name(self) -> str:
        """Names the group for the router: every member reports the same."""
        return f"{self.master_addr}:{self.master_port}"
