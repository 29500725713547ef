"""Model shapes as the step-time model needs them: bytes a decode step reads and sends, FLOPs it runs.

Qwen3-MoE shapes come from nanocp.model_config (the presets the engine serves, or a Hugging Face config.json).
Qwen3-235B-A22B is written out here; DeepSeek-V3 is approximated: its MLA cache as KV bytes per token (the 512-wide
latent plus the 64-wide rope key, for every layer), its attention as one dense block of that parameter count, its
shared expert as dense weights every instance holds, FP8 weights, and every layer a MoE layer (it has 3 dense ones).
"""

from __future__ import annotations

from dataclasses import dataclass

from nanocp.model_config import PRESETS, ModelConfig


@dataclass(frozen=True)
class ModelShape:
    name: str
    layers: int
    hidden: int
    q_heads: int
    head_dim: int  # of a query row as attention reads it (MLA: latent + rope, the absorbed form)
    value_dim: int  # of an attention output row (MLA: the latent)
    kv_bytes_per_token_layer: int  # KV cache bytes one token adds in one layer
    dense_params_per_layer: int  # attention projections, norms, router gate, shared experts: on every instance
    experts: int
    top_k: int
    expert_params: int  # one routed expert of one layer
    vocab: int
    weight_bytes: int = 2  # per parameter
    activation_bytes: int = 2  # per element of what the MoE all-to-all and the query routes carry

    @property
    def kv_bytes_per_token(self) -> int:
        return self.kv_bytes_per_token_layer * self.layers

    def weight_bytes_per_instance(self, instances: int) -> int:
        """What one instance holds: all dense weights, 1/N of the experts, embeddings and LM head."""
        experts = self.experts // instances + (self.experts % instances > 0)
        per_layer = self.dense_params_per_layer + experts * self.expert_params
        return (self.layers * per_layer + 2 * self.vocab * self.hidden) * self.weight_bytes

    @property
    def cp_row_bytes(self) -> int:
        """One routed query row per layer: the query out, its partial (output and log-sum-exp, float32) back."""
        return self.q_heads * (self.head_dim * self.activation_bytes + (self.value_dim + 1) * 4)

    @property
    def moe_row_bytes(self) -> int:
        """One token's hidden state sent to one expert holder (dispatch; the combine sends as much back)."""
        return self.hidden * self.activation_bytes


def from_config(config: ModelConfig) -> ModelShape:
    """The shape of a Qwen3-MoE model (GQA attention, routed experts only)."""
    h, q, kv = config.hidden_size, config.q_size, config.kv_size
    dtype_bytes = 4 if config.dtype == "float32" else 2
    return ModelShape(
        name=config.name,
        layers=config.num_layers,
        hidden=h,
        q_heads=config.num_heads,
        head_dim=config.head_dim,
        value_dim=config.head_dim,
        kv_bytes_per_token_layer=2 * kv * dtype_bytes,
        dense_params_per_layer=h * (q + 2 * kv) + q * h + h * config.num_experts,
        experts=config.num_experts,
        top_k=config.experts_per_token,
        expert_params=3 * h * config.expert_width,
        vocab=config.vocab_size,
        weight_bytes=dtype_bytes,
        activation_bytes=dtype_bytes,
    )


def _deepseek_v3() -> ModelShape:
    hidden, heads, q_rank, kv_rank, rope, nope, v = 7168, 128, 1536, 512, 64, 128, 128
    attention = hidden * q_rank + q_rank * heads * (nope + rope) + hidden * (kv_rank + rope)
    attention += kv_rank * heads * (nope + v) + heads * v * hidden
    shared_expert = 3 * hidden * 2048
    return ModelShape(
        name="deepseek-v3",
        layers=61,
        hidden=hidden,
        q_heads=heads,
        head_dim=kv_rank + rope,
        value_dim=kv_rank,
        kv_bytes_per_token_layer=(kv_rank + rope) * 2,
        dense_params_per_layer=attention + shared_expert + hidden * 256,
        experts=256,
        top_k=8,
        expert_params=3 * hidden * 2048,
        vocab=129280,
        weight_bytes=1,
    )


SHAPES: dict[str, ModelShape] = {
    "tiny": from_config(PRESETS["tiny"]),
    "qwen3-30b-a3b": from_config(PRESETS["qwen3-30b-a3b"]),
    "qwen3-235b-a22b": from_config(
        ModelConfig(
            name="qwen3-235b-a22b",
            vocab_size=151936,
            hidden_size=4096,
            num_layers=94,
            num_heads=64,
            num_kv_heads=4,
            head_dim=128,
            num_experts=128,
            experts_per_token=8,
            expert_width=1536,
            max_context=40960,
        )
    ),
    "deepseek-v3": _deepseek_v3(),
}
