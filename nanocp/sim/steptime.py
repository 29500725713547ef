"""The simulated world's step time: what a lockstep decode step of the group costs, from bytes and latencies.

Per instance i, its own work in a step (every layer the same):
- dense weights (attention projections, norms, gate, shared experts) read once if it has tokens, at the weight
  efficiency of the copy bandwidth, plus an attention kernel latency; its KV tokens read (own shards and the remote
  shards it answers for) at the KV efficiency; prefill attention FLOPs; a merge when it routes CP rows;
- the experts it holds: EP spreads every token's top-k over the group, so expert work depends on the group's tokens,
  not the home's: the expected bytes of the experts touched (1/N of them, each touched unless no token picks it)
  or the FLOPs, whichever is slower, plus a kernel latency;
- a fixed latency per layer and per step, the LM head, and per home token and routed row (host work: large on CPU,
  nil under CUDA graphs).
The group's step is the slowest instance's own work plus communication, which is lockstep for everyone: per layer,
the MoE all-to-all out and back (latency, a share per peer, and the bytes of the busiest sender) and, when any CP
route runs, its two legs (latency and the busiest instance's rows).

Coefficients (efficiencies and latencies) are calibrated from the project's benchmarks (nanocp.sim.calibration);
the device and link give bandwidths and FLOPs. `router_cost` derives the router's linear CostModel from the same
numbers, so dcp and balanced decide with a view of this world (a linear proxy, not this model).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from nanocp.router.cost import CostModel
from nanocp.sim.hardware import Device, Link
from nanocp.sim.shapes import ModelShape


@dataclass(frozen=True)
class Coefficients:
    kv_efficiency: float = 1.0  # fraction of copy bandwidth at which attention reads KV
    weight_efficiency: float = 0.8  # ... at which weights are read
    flops_efficiency: float = 0.35  # fraction of peak FLOPs of compute-bound kernels
    attention_latency_s: float = 15e-6  # per layer, an attention call
    expert_latency_s: float = 40e-6  # per layer, the expert kernels
    layer_fixed_s: float = 100e-6  # per layer, every other kernel
    step_fixed_s: float = 0.0  # per step: host work that does not overlap the device
    token_s: float = 0.0  # per home token and step: host work
    row_s: float = 0.0  # per routed segment and step: host work
    merge_s: float = 6e-6  # per layer, merging partials on an instance that routes CP rows


@dataclass(frozen=True)
class StepTimes:
    step_s: float
    own_s: list[float]  # each instance's own work (communication left out)


class StepModel:
    def __init__(self, shape: ModelShape, device: Device, link: Link, coefficients: Coefficients, instances: int):
        self.shape, self.device, self.link, self.coefficients, self.instances = (
            shape,
            device,
            link,
            coefficients,
            instances,
        )
        c, L, n = coefficients, shape.layers, instances
        weight_bw = device.copy_bytes_per_s * c.weight_efficiency
        flops = device.flops * c.flops_efficiency
        # Per step of an instance that has tokens; per home token; per routed row; per KV token read; per pair.
        self._active_s = shape.vocab * shape.hidden * shape.weight_bytes / weight_bw + L * (
            c.attention_latency_s + shape.dense_params_per_layer * shape.weight_bytes / weight_bw
        )
        self._token_s = c.token_s + 2 * (shape.vocab * shape.hidden + L * shape.dense_params_per_layer) / flops
        self._row_s = c.row_s
        self._kv_s = L * shape.kv_bytes_per_token_layer / (device.copy_bytes_per_s * c.kv_efficiency)
        self._pair_s = L * 4 * shape.q_heads * shape.head_dim / flops
        self._merge_s = L * c.merge_s
        self._fixed_s = c.step_fixed_s + L * c.layer_fixed_s
        self._expert_bytes_s = shape.expert_params * shape.weight_bytes / weight_bw
        self._expert_row_s = 2 * shape.expert_params / flops
        self._experts_held = shape.experts / n
        self._unpicked = 1 - shape.top_k / shape.experts
        peers = n - 1
        self._moe_comm_s = 2 * L * (link.alltoall_latency_s + link.per_peer_latency_s * peers) if n > 1 else 0.0
        self._moe_byte_s = 2 * L * shape.top_k * peers / n * shape.moe_row_bytes / link.bytes_per_s
        self._cp_comm_s = 2 * L * link.p2p_latency_s
        self._cp_row_s = L * shape.cp_row_bytes / link.bytes_per_s

    def experts_s(self, group_tokens: int) -> float:
        """Each instance's expert work a step: the group's tokens spread over every instance's experts."""
        if group_tokens == 0:
            return 0.0
        touched = self._experts_held * (1 - self._unpicked**group_tokens)
        rows = group_tokens * self.shape.top_k / self.instances
        memory, compute = touched * self._expert_bytes_s, rows * self._expert_row_s
        return self.shape.layers * (self.coefficients.expert_latency_s + max(memory, compute))

    def step(
        self,
        home: list[int],
        kv: list[int],
        rows: list[int],
        segments: list[int] | None = None,
        pairs: list[int] | None = None,
    ) -> StepTimes:
        """The group's step from each instance's home tokens, KV tokens read (per layer) and routed rows (sent and
        answered). With chunked prefill also its routed segments (a (request, shard) pair's rows travel and are
        attended together: host work goes by segment, bytes by row; without prefill every row is a segment) and its
        prefill attention pairs (query rows x KV tokens, per layer)."""
        group_tokens = sum(home)
        base = self._fixed_s + self.experts_s(group_tokens)
        active, per_token, per_row, per_kv, merge = (
            self._active_s,
            self._token_s,
            self._row_s,
            self._kv_s,
            self._merge_s,
        )
        own = [
            base + (active if h or r else 0.0) + h * per_token + s * per_row + k * per_kv + (merge if r else 0.0)
            for h, k, r, s in zip(home, kv, rows, segments or rows, strict=True)
        ]
        if pairs is not None:
            own = [o + p * self._pair_s for o, p in zip(own, pairs, strict=True)]
        comm = 0.0
        if group_tokens:
            comm += self._moe_comm_s + max(home) * self._moe_byte_s
        most_rows = max(rows)
        if most_rows:
            comm += self._cp_comm_s + most_rows * self._cp_row_s
        return StepTimes(max(own) + comm, own)

    def router_cost(self) -> CostModel:
        """The router's linear view of this world, in ms: per KV token, home token (its own work and its share of the
        busiest all-to-all sender), routed row, the fixed part, and a CP route's latency."""
        return CostModel(
            kv_token_ms=1e3 * self._kv_s,
            home_token_ms=1e3 * (self._token_s + self._moe_byte_s),
            routed_row_ms=1e3 * (self._row_s + self._cp_row_s),
            fixed_ms=1e3 * (self._fixed_s + self._moe_comm_s),
            cp_step_ms=1e3 * (self._cp_comm_s + self._merge_s),
        )


def straggler_ratio(own: list[float]) -> float:
    """The slowest instance's own work over the median instance's."""
    median = statistics.median(own)
    return max(own) / median if median > 0 else 1.0
