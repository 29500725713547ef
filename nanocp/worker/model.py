"""The Qwen3-MoE architecture in plain torch, as Hugging Face's Qwen3MoeForCausalLM computes it.

Layers keep a plain forward(x) signature; a per-step context (made by the model runner) carries the positions and
the attention backend holding the step's plan, as in nano-vllm.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from nanocp import kernels
from nanocp.model_config import ModelConfig
from nanocp.worker import routing
from nanocp.worker.attention import PagedAttention
from nanocp.worker.timing import StepTimer


@dataclass(frozen=True)
class ExpertShard:
    """Which experts this instance holds: a contiguous 1/size of them (expert parallelism over the group)."""

    rank: int = 0
    size: int = 1

    def local_experts(self, num_experts: int) -> range:
        per_rank = num_experts // self.size
        return range(self.rank * per_rank, (self.rank + 1) * per_rank)


@dataclass
class StepContext:
    positions: torch.Tensor  # (tokens,) position of each token in its request
    attention: PagedAttention  # with the step's plan set
    moe_capacity: int = 0  # slots per peer of the MoE route: the group's largest home batch x top-k (or fewer)
    timer: StepTimer = field(default_factory=lambda: StepTimer(enabled=False))


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.rms_norm(x, self.weight, self.eps)

    def add_and_norm(
        self, x: torch.Tensor | kernels.ExpertOutputs, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual stream after adding x (an MoE layer's outputs: combined first), normalised, and the stream
        itself (one kernel on CUDA)."""
        return kernels.add_rms_norm(x, residual, self.weight, self.eps)


class Linear(nn.Linear):
    """A projection without bias; on CUDA a decode step's few rows take one Triton launch that reads the weight
    while the kernel before it still runs (kernels/triton_linear.py), more rows cuBLAS."""

    def __init__(self, inputs: int, outputs: int) -> None:
        super().__init__(inputs, outputs, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            from nanocp.kernels import triton_linear

            if triton_linear.applies(x, self.weight):
                return triton_linear.small_linear(x, self.weight)
        return F.linear(x, self.weight)


class Rotary(nn.Module):
    """The rotary tables in float32 (positions, head_dim), as transformers computes them; the attention block looks
    up its tokens' rows (inside its fused kernel on CUDA)."""

    cos: torch.Tensor
    sin: torch.Tensor

    def __init__(self, head_dim: int, theta: float, max_positions: int) -> None:
        super().__init__()
        self.head_dim, self.theta, self.max_positions = head_dim, theta, max_positions
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self.reset()

    def reset(self) -> None:
        """(Re)computes the tables in float32 on the module's device, as transformers does."""
        device = self.cos.device
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).float() / self.head_dim
        inv_freq = 1.0 / (self.theta**exponents)
        freqs = torch.outer(torch.arange(self.max_positions, device=device).float(), inv_freq)
        angles = torch.cat([freqs, freqs], dim=-1)
        self.cos, self.sin = angles.cos(), angles.sin()


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.config = config
        self.layer = layer
        self.qkv_proj = Linear(config.hidden_size, config.q_size + 2 * config.kv_size)
        self.o_proj = Linear(config.q_size, config.hidden_size)
        self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, ctx: StepContext, rotary: Rotary) -> torch.Tensor:
        c = self.config
        q, k, v = kernels.qk_norm_rope(
            self.qkv_proj(x),
            ctx.positions,
            self.q_norm.weight,
            self.k_norm.weight,
            rotary.cos,
            rotary.sin,
            c.rms_norm_eps,
            c.num_heads,
            c.num_kv_heads,
            store=ctx.attention.local_kv(self.layer),
        )
        out = ctx.attention.run(self.layer, q, k, v)
        return self.o_proj(out.reshape(-1, c.q_size))


class SparseMoE(nn.Module):
    """Top-k softmax router over the experts, SwiGLU experts, weighted sum of the chosen experts' outputs.

    This instance holds only its shard of the experts: each (token, expert) row is routed to the instance holding
    the expert, computed there, and routed back, through the group's routing layer.
    """

    def __init__(self, config: ModelConfig, shard: ExpertShard) -> None:
        super().__init__()
        self.config = config
        self.shard = shard
        e, w, h = len(shard.local_experts(config.num_experts)), config.expert_width, config.hidden_size
        self.gate = Linear(h, config.num_experts)
        self.w_gate_up = nn.Parameter(torch.empty(e, 2 * w, h))
        self.w_down = nn.Parameter(torch.empty(e, h, w))

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each token's top-k experts and their weights."""
        c = self.config
        return kernels.route_topk(self.gate(x), c.experts_per_token, c.norm_topk_prob, x.dtype)

    def forward(self, x: torch.Tensor, ctx: StepContext) -> kernels.ExpertOutputs:
        """The experts' output rows, combined by the next norm as it adds them to the residual stream."""
        weights, experts = self.route(x)
        # The (token, expert) rows sorted by expert, hence by holder; found on the device, so the step waits for no
        # host round trip per layer.
        entries, position, ends = kernels.sort_by_expert(experts, self.config.num_experts)
        rows = kernels.TokenRows(x, entries, self.config.experts_per_token)
        if self.shard.size == 1 and not routing.grouped():
            with ctx.timer.section("moe_compute"):  # the expert kernels read each row from its token
                y = kernels.grouped_swiglu_by_ends(rows, ends, self.w_gate_up, self.w_down)
        else:
            y = self._routed_experts(rows.gather(), experts.flatten()[entries], ends, ctx)
        return kernels.ExpertOutputs(y, position, weights)

    def _routed_experts(
        self, rows: torch.Tensor, sorted_experts: torch.Tensor, ends: torch.Tensor, ctx: StepContext
    ) -> torch.Tensor:
        """rows: by expert, hence by holder. Out to the experts' holders through the routing layer (the slots found
        on the device, the capacity from the step), computed there, and back."""
        peers, per_peer = self.shard.size, self.w_gate_up.shape[0]
        holders = sorted_experts // per_peer
        route = routing.FixedRoute.by_destination(holders, peers, ctx.moe_capacity)
        with ctx.timer.section("moe_route"):
            # How many rows of each local expert each peer sends: the receiver finds every slot's expert from it.
            per_expert = torch.diff(ends, prepend=ends.new_zeros(1)).view(peers, per_peer)
            counts = routing.exchange(per_expert)
            received = route.forward(rows)
        slot = torch.arange(ctx.moe_capacity, device=rows.device).expand(peers, -1).contiguous()
        # A slot's expert: how many of its peer's expert ends it has passed; per_peer past the last (empty slots).
        expert_of = torch.searchsorted(counts.cumsum(dim=1), slot, right=True).flatten()
        by_expert = torch.argsort(expert_of, stable=True)  # peer by peer within each expert; empty slots last
        with ctx.timer.section("moe_compute"):
            bounds = torch.arange(1, per_peer + 1, device=rows.device)
            local_ends = torch.searchsorted(expert_of[by_expert], bounds, out_int32=True)
            y_sorted = kernels.grouped_swiglu_by_ends(received[by_expert], local_ends, self.w_gate_up, self.w_down)
        y = torch.empty_like(y_sorted).index_copy_(0, by_expert, y_sorted)
        with ctx.timer.section("moe_route"):
            return route.backward(y)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, shard: ExpertShard) -> None:
        super().__init__()
        self.input_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = Attention(config, layer)
        self.post_attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.moe = SparseMoE(config, shard)

    def forward(
        self, x: torch.Tensor | kernels.ExpertOutputs, residual: torch.Tensor | None, ctx: StepContext, rotary: Rotary
    ) -> tuple[kernels.ExpertOutputs, torch.Tensor]:
        """x: the previous layer's MoE output (the embeddings for the first layer, whose residual is None).
        Returns this layer's MoE output and the residual stream before it is added."""
        if residual is None:
            assert isinstance(x, torch.Tensor), "the first layer takes the embeddings"
            h, residual = self.input_norm(x), x
        else:
            h, residual = self.input_norm.add_and_norm(x, residual)
        h, residual = self.post_attn_norm.add_and_norm(self.attn(h, ctx, rotary), residual)
        return self.moe(h, ctx), residual


class Qwen3Moe(nn.Module):
    def __init__(self, config: ModelConfig, shard: ExpertShard | None = None) -> None:
        super().__init__()
        self.config = config
        self.shard = shard or ExpertShard()
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.rotary = Rotary(config.head_dim, config.rope_theta, config.max_context)
        self.layers = nn.ModuleList(DecoderLayer(config, i, self.shard) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight

    def forward(self, token_ids: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """Hidden states after the final norm, one row per token."""
        x: torch.Tensor | kernels.ExpertOutputs = self.embed(token_ids)
        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual, ctx, self.rotary)
        assert residual is not None, "a model has layers"
        return self.norm.add_and_norm(x, residual)[0]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
