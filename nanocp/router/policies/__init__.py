"""Placement policies by name; each is one small object behind nanocp.router.placement.PlacementPolicy."""

from __future__ import annotations

from nanocp.router.cost import CostModel
from nanocp.router.placement import PlacementPolicy
from nanocp.router.policies.balanced import BalancedPolicy
from nanocp.router.policies.dcp import DCPPolicy
from nanocp.router.policies.names import DEFAULT_MAX_DEGREE, DEFAULT_SHARD_TOKENS, POLICY_NAMES
from nanocp.router.policies.static import StaticPolicy
from nanocp.router.policies.uniform import UniformPolicy


def make_policy(
    name: str,
    *,
    cp_degree: int | None = None,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    max_degree: int = DEFAULT_MAX_DEGREE,
    cost: CostModel | None = None,
) -> PlacementPolicy:
    """`cp_degree` is uniform's D (default: the whole group); `shard_tokens`, `max_degree` and `cost` tune dcp;
    `cost` also drives balanced."""
    if name == "static":
        return StaticPolicy()
    if name == "balanced":
        return BalancedPolicy(cost)
    if name == "dcp":
        return DCPPolicy(shard_tokens, max_degree, cost)
    if name == "uniform":
        return UniformPolicy(cp_degree or 1_000_000)  # capped by the group's size
    raise ValueError(f"unknown placement policy {name!r}; choose one of {', '.join(POLICY_NAMES)}")
