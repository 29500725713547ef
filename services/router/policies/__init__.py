"""Placement policies by name; each is one small object behind nanocp.router.placement.PlacementPolicy."""

from __future__ import annotations

from collections.abc import Callable

from nanocp.router.placement import PlacementPolicy
from nanocp.router.policies.static import StaticPolicy

POLICIES: dict[str, Callable[[], PlacementPolicy]] = {"static": StaticPolicy}


def make_policy(name: str) -> PlacementPolicy:
    if name not in POLICIES:
        raise ValueError(f"unknown placement policy {name!r}; choose one of {', '.join(POLICIES)}")
    return POLICIES[name]()
