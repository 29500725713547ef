"""Writes small random Qwen3-MoE checkpoints with transformers itself, so tests and benchmarks have an oracle."""

from __future__ import annotations

from pathlib import Path
from typing import Any

SMALL = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    moe_intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    num_experts=8,
    num_experts_per_tok=2,
    norm_topk_prob=True,
    max_position_embeddings=1024,
    rope_theta=1_000_000.0,
    # Sharper random distributions than the default 0.02, so greedy choices are not near-ties.
    initializer_range=0.08,
    eos_token_id=None,
)


def write_random_checkpoint(path: Path, seed: int = 0, **overrides: Any) -> Path:
    """A Hugging Face directory (config.json + model.safetensors) of a random Qwen3MoeForCausalLM in float32."""
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    settings = {**SMALL, **overrides}
    rope_theta = settings.pop("rope_theta")
    config = Qwen3MoeConfig(**settings, rope_parameters={"rope_type": "default", "rope_theta": rope_theta})
    torch.manual_seed(seed)
    model = Qwen3MoeForCausalLM(config)  # float32, the default dtype
    # Norm weights start at one; random ones exercise the norms the way trained weights do.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                param.uniform_(0.5, 1.5)
    model.save_pretrained(path)
    return path
