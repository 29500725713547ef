"""What a model is: its shapes and limits, read from a Hugging Face config.json or a built-in preset.

Both the router (to validate prompts) and the worker (to build the model) read this; neither needs weights for it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any


class ModelConfigError(ValueError):
    """A model directory or preset that nanocp cannot serve, with the reason in the message."""


@dataclass(frozen=True)
class ModelConfig:
    name: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int
    experts_per_token: int
    expert_width: int
    max_context: int
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    norm_topk_prob: bool = True
    tie_word_embeddings: bool = False
    eos_token_ids: tuple[int, ...] = ()
    dtype: str = "bfloat16"
    # Directory with config.json and safetensors; None for a preset with seeded random weights.
    path: str | None = field(default=None, compare=False)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return 2 * self.num_layers * self.kv_size * dtype_bytes


PRESETS: dict[str, ModelConfig] = {
    # Small enough that a CPU step takes milliseconds; bytes are its vocabulary (see nanocp.tokenizer).
    "tiny": ModelConfig(
        name="tiny",
        vocab_size=384,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        num_experts=8,
        experts_per_token=2,
        expert_width=32,
        max_context=4096,
        eos_token_ids=(257,),
        dtype="float32",
    ),
    # The shapes of Qwen3-30B-A3B (random weights) for GPU benchmarks.
    "qwen3-30b-a3b": ModelConfig(
        name="qwen3-30b-a3b",
        vocab_size=151936,
        hidden_size=2048,
        num_layers=48,
        num_heads=32,
        num_kv_heads=4,
        head_dim=128,
        num_experts=128,
        experts_per_token=8,
        expert_width=768,
        max_context=40960,
        eos_token_ids=(151645, 151643),
    ),
}


def _eos_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def from_hf_config(path: Path) -> ModelConfig:
    """Reads a Qwen3-MoE config.json (and generation_config.json for end-of-sequence tokens)."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelConfigError(f"{path} has no config.json; give a Hugging Face model directory or a preset")
    hf = json.loads(config_file.read_text())
    if hf.get("model_type") != "qwen3_moe":
        raise ModelConfigError(f"{config_file}: model_type is {hf.get('model_type')!r}; nanocp serves 'qwen3_moe'")
    if hf.get("mlp_only_layers") or hf.get("decoder_sparse_step", 1) != 1:
        raise ModelConfigError(f"{config_file}: every layer must be a MoE layer (mlp_only_layers, decoder_sparse_step)")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", "default") != "default":
        raise ModelConfigError(f"{config_file}: rope_type {rope['rope_type']!r} is not supported, only 'default'")
    eos = _eos_ids(hf.get("eos_token_id"))
    generation_file = path / "generation_config.json"
    if generation_file.is_file():
        eos = tuple(dict.fromkeys(eos + _eos_ids(json.loads(generation_file.read_text()).get("eos_token_id"))))
    num_heads = int(hf["num_attention_heads"])
    return ModelConfig(
        name=path.name,
        vocab_size=int(hf["vocab_size"]),
        hidden_size=int(hf["hidden_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=num_heads,
        num_kv_heads=int(hf["num_key_value_heads"]),
        head_dim=int(hf.get("head_dim") or hf["hidden_size"] // num_heads),
        num_experts=int(hf.get("num_experts", hf.get("num_local_experts", 0))),
        experts_per_token=int(hf["num_experts_per_tok"]),
        expert_width=int(hf["moe_intermediate_size"]),
        max_context=int(hf["max_position_embeddings"]),
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        eos_token_ids=eos,
        dtype=str(hf.get("dtype") or hf.get("torch_dtype") or "bfloat16"),
        path=str(path),
    )


def load_model_config(spec: str, **overrides: Any) -> ModelConfig:
    """`spec` is a preset name or a model directory; overrides replace fields (for example dtype)."""
    if spec in PRESETS:
        config = PRESETS[spec]
    elif Path(spec).is_dir():
        config = from_hf_config(Path(spec))
    else:
        raise ModelConfigError(f"model {spec!r} is neither a preset ({', '.join(PRESETS)}) nor a directory")
    known = {f.name for f in fields(ModelConfig)}
    unknown = set(overrides) - known
    if unknown:
        raise ModelConfigError(f"unknown model settings: {', '.join(sorted(unknown))}")
    return replace(config, **{k: v for k, v in overrides.items() if v is not None})
