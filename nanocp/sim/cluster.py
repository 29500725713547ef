"""What is simulated: one decode group (model, device, link, size, KV pool) and the router policy placing on it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from nanocp.router.placement import InstanceLoad, PlacementPolicy
from nanocp.router.policies import make_policy
from nanocp.router.policies.names import DEFAULT_MAX_DEGREE, DEFAULT_SHARD_TOKENS
from nanocp.sim.hardware import Device, Link
from nanocp.sim.shapes import ModelShape
from nanocp.sim.steptime import Coefficients, StepModel


@dataclass(frozen=True)
class Cluster:
    shape: ModelShape
    device: Device
    link: Link
    instances: int
    coefficients: Coefficients = field(default_factory=Coefficients)
    page_size: int = 16
    kv_pages: int | None = None  # per instance; default: the device's memory less weights and reserve
    kv_bytes: float | None = None  # or the KV pool in bytes per instance
    # disaggregated: prompts are prefilled elsewhere and their KV arrives with the request (a decode group of a
    # prefill/decode split, as Mooncake runs); chunked: the group prefills in its own steps, as nanocp's engine does.
    prefill: Literal["disaggregated", "chunked"] = "disaggregated"
    max_step_tokens: int = 512  # chunked prefill: tokens an instance feeds a step
    max_running: int = 256  # requests an instance runs at once

    def pages_per_instance(self) -> int:
        if self.kv_pages is not None:
            return self.kv_pages
        pool = self.kv_bytes
        if pool is None:
            weights = self.shape.weight_bytes_per_instance(self.instances)
            pool = self.device.memory_bytes - self.device.reserved_bytes - weights
        pages = int(pool // (self.shape.kv_bytes_per_token * self.page_size))
        if pages < 1:
            raise ValueError(
                f"{self.shape.name} on {self.instances} x {self.device.name} leaves no memory for KV: each instance "
                f"holds {self.shape.weight_bytes_per_instance(self.instances) / 1e9:.1f} GB of weights"
            )
        return pages

    def capacities(self) -> list[InstanceLoad]:
        """The group's instances as the router sees them when nothing is placed."""
        pages = self.pages_per_instance()
        return [InstanceLoad(f"i{r}", self.page_size, pages, group="g0", rank=r) for r in range(self.instances)]

    def step_model(self) -> StepModel:
        return StepModel(self.shape, self.device, self.link, self.coefficients, self.instances)


@dataclass(frozen=True)
class PolicySpec:
    """A router policy and its settings, as `nanocp router` takes them."""

    name: str
    cp_degree: int | None = None  # uniform's D
    shard_tokens: int = DEFAULT_SHARD_TOKENS  # dcp's smallest shard
    max_degree: int = DEFAULT_MAX_DEGREE  # dcp's cap

    @property
    def label(self) -> str:
        return f"uniform D={self.cp_degree}" if self.name == "uniform" and self.cp_degree else self.name

    def build(self, cluster: Cluster) -> PlacementPolicy:
        """The router's own policy object; dcp and balanced decide with the cluster's derived cost model."""
        return make_policy(
            self.name,
            cp_degree=self.cp_degree,
            shard_tokens=self.shard_tokens,
            max_degree=self.max_degree,
            cost=cluster.step_model().router_cost(),
        )
