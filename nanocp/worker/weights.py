"""Builds the model on its device with weights from a Hugging Face directory, or seeded random weights for presets."""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from nanocp.model_config import ModelConfig, ModelConfigError
from nanocp.worker.model import ExpertShard, Qwen3Moe, RMSNorm, Rotary

_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_EXPERT = re.compile(r"mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")
_SIMPLE = {
    "input_layernorm.weight": "input_norm.weight",
    "post_attention_layernorm.weight": "post_attn_norm.weight",
    "self_attn.o_proj.weight": "attn.o_proj.weight",
    "self_attn.q_norm.weight": "attn.q_norm.weight",
    "self_attn.k_norm.weight": "attn.k_norm.weight",
    "mlp.gate.weight": "moe.gate.weight",
}
_EXPERT_PARAMS = ("moe.w_gate_up", "moe.w_down")


def build_model(config: ModelConfig, device: str, seed: int = 0, shard: ExpertShard | None = None) -> Qwen3Moe:
    """Allocates the model directly on `device` in the config's dtype, then fills every parameter.

    With an expert shard, only that shard's experts are allocated and loaded.
    """
    shard = shard or ExpertShard()
    if config.num_experts % shard.size:
        raise ModelConfigError(
            f"{config.num_experts} experts cannot be split evenly over a group of {shard.size} instances"
        )
    with torch.device("meta"):
        model = Qwen3Moe(config, shard)
    model = model.to(getattr(torch, config.dtype)).to_empty(device=device)
    for module in model.modules():
        if isinstance(module, Rotary):
            module.reset()  # buffers made on the meta device hold no values
    if config.path is None:
        _init_random(model, seed)
    else:
        _load_checkpoint(model, Path(config.path))
    return model.eval()


def _init_random(model: Qwen3Moe, seed: int, std: float = 0.02) -> None:
    """Seeds each tensor by its name (and each expert by its global index), so every group size gets one model."""
    device = model.embed.weight.device
    norms = {id(m.weight) for m in model.modules() if isinstance(m, RMSNorm)}
    experts = model.shard.local_experts(model.config.num_experts)

    def fill(tensor: torch.Tensor, key: str) -> None:
        generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
        tensor.normal_(0.0, std, generator=generator)

    with torch.no_grad():
        for name, param in model.named_parameters():
            if id(param) in norms:
                param.fill_(1.0)
            elif name.endswith(_EXPERT_PARAMS):
                for local, expert in enumerate(experts):
                    fill(param[local], f"{name}.{expert}")
            else:
                fill(param, name)


def _checkpoint_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise ModelConfigError(f"{path} has no .safetensors files")
    for name in files:
        with safe_open(str(path / name), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                yield key, f.get_tensor(key)


def _load_checkpoint(model: Qwen3Moe, path: Path) -> None:
    c = model.config
    params = dict(model.named_parameters())
    filled: set[str] = set()
    experts = model.shard.local_experts(c.num_experts)
    with torch.no_grad():
        for key, tensor in _checkpoint_tensors(path):
            target, rows = _target(key, c, experts)
            if target is None:
                continue
            if target not in params:
                raise ModelConfigError(f"{path}: checkpoint tensor {key} has no place in a {c.num_layers}-layer model")
            param = params[target]
            view = param if rows is None else param[rows]
            if tuple(view.shape) != tuple(tensor.shape):
                raise ModelConfigError(f"{path}: {key} has shape {tuple(tensor.shape)}, expected {tuple(view.shape)}")
            view.copy_(tensor)
            filled.add(target)
    missing = sorted(set(params) - filled - ({"lm_head.weight"} if c.tie_word_embeddings else set()))
    if missing:
        raise ModelConfigError(f"{path}: checkpoint lacks {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")


def _target(key: str, c: ModelConfig, experts: range) -> tuple[str | None, tuple[int | slice, ...] | None]:
    """Our parameter name for a checkpoint tensor, and which part of it the tensor fills (None: all of it).

    Experts outside this instance's shard have no target.
    """
    if key == "model.embed_tokens.weight":
        return "embed.weight", None
    if key == "model.norm.weight":
        return "norm.weight", None
    if key == "lm_head.weight":
        return (None, None) if c.tie_word_embeddings else ("lm_head.weight", None)
    layer = _LAYER.fullmatch(key)
    if layer is None:
        return None, None
    prefix, rest = f"layers.{layer.group(1)}.", layer.group(2)
    if rest in _SIMPLE:
        return prefix + _SIMPLE[rest], None
    qkv = {"q_proj": (0, c.q_size), "k_proj": (c.q_size, c.kv_size), "v_proj": (c.q_size + c.kv_size, c.kv_size)}
    for name, (start, size) in qkv.items():
        if rest == f"self_attn.{name}.weight":
            return prefix + "attn.qkv_proj.weight", (slice(start, start + size),)
    expert = _EXPERT.fullmatch(rest)
    if expert is not None:
        e, which = int(expert.group(1)), expert.group(2)
        if e not in experts:
            return None, None
        e -= experts.start
        w = c.expert_width
        if which == "down_proj":
            return prefix + "moe.w_down", (e,)
        return prefix + "moe.w_gate_up", (e, slice(0, w) if which == "gate_proj" else slice(w, 2 * w))
    return None, None
