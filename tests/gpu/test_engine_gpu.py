"""The engine on a GPU in bf16 against the engine on the CPU in float32, on the same weights.

bf16 weights, activations and KV move logits by about 1e-2 of their spread, and random models have many near-ties,
so greedy sequences part after a few tokens (the third or fourth here) and differ from then on. What is asserted:
prompt logits within a bf16 tolerance (LOGIT_RTOL of the float32 logits' norm, per prompt), and greedy tokens equal
up to the first token where they part, which must be a near-tie on the CPU: the float32 logit of the CPU's token
exceeds that of the GPU's by less than TIE standard deviations of that row's logits.
Skips without CUDA. On the GPU machine: python3 -m pytest --noconftest -q tests/gpu.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from nanocp.checkpoint import write_random_checkpoint
from nanocp.model_config import load_model_config
from nanocp.worker.engine import Engine, EngineConfig
from nanocp.worker.model import Qwen3Moe, Rotary
from nanocp.worker.request import RequestOutput, SamplingParams
from nanocp.worker.weights import build_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

LOGIT_RTOL = 3e-2
TIE = 0.1
NEW_TOKENS = 24
PROMPT_LENGTHS = (5, 17, 40, 63)
CONFIG = EngineConfig(page_size=16, num_pages=64, max_step_tokens=256)
GPU = EngineConfig(page_size=16, num_pages=64, max_step_tokens=256, device="cuda", dtype="bfloat16")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Heads of 64: the smallest FlashInfer's kernels take, so this model runs them (the tiny preset's heads of 16
    # take the torch attention on the GPU).
    return write_random_checkpoint(tmp_path_factory.mktemp("qwen3moe"), seed=1, head_dim=64)


def prompts(vocab: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(7)
    return [torch.randint(0, vocab, (n,), generator=generator).tolist() for n in PROMPT_LENGTHS]


def to_gpu(model: Qwen3Moe) -> Qwen3Moe:
    """The CPU model's weights in bf16 on the GPU (presets draw random weights per device, so a GPU build of a preset
    is another model); rotary tables are recomputed in float32, as the engine keeps them."""
    model = model.to(device="cuda", dtype=torch.bfloat16)
    for module in model.modules():
        if isinstance(module, Rotary):
            module.reset()
    return model


def engines(spec: str, gpu: EngineConfig = GPU) -> tuple[Engine, Engine]:
    cpu = Engine.from_spec(spec, CONFIG)
    if Path(spec).is_dir():
        return cpu, Engine.from_spec(spec, gpu)
    model_config = load_model_config(spec, dtype="bfloat16")
    return cpu, Engine(model_config, to_gpu(build_model(cpu.model_config, "cpu", CONFIG.seed)), gpu)


def prompt_logits(engine: Engine, batch: list[list[int]]) -> torch.Tensor:
    for i, prompt in enumerate(batch):
        engine.add_request(f"p{i}", prompt, SamplingParams(temperature=0, max_tokens=1), lambda _: None)
    planned = engine.plan_step(engine.scheduler.schedule())
    assert planned is not None
    inputs, _ = planned
    with torch.inference_mode():
        logits = engine.runner.model.logits(engine.runner.eager(inputs)).cpu()
    for i in range(len(batch)):
        engine.abort(f"p{i}")  # planned, never run: the engine takes them back
    return logits


def generate(engine: Engine, batch: list[list[int]]) -> list[list[int]]:
    outputs: dict[str, list[int]] = {}

    def collect(out: RequestOutput) -> None:
        outputs.setdefault(out.request_id, []).extend(out.new_token_ids)

    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    for i, prompt in enumerate(batch):
        engine.add_request(f"g{i}", prompt, params, collect)
    while engine.step():
        pass
    return [outputs[f"g{i}"] for i in range(len(batch))]


@pytest.mark.parametrize("graphs", [True, False], ids=["graphs", "eager"])
@pytest.mark.parametrize("spec", ["tiny", "checkpoint"])
def test_gpu_bf16_engine_matches_cpu_float32(spec: str, graphs: bool, checkpoint: Path) -> None:
    """Decode steps replay CUDA graphs where the model takes FlashInfer (the checkpoint's heads of 64)."""
    cpu, gpu = engines(str(checkpoint) if spec == "checkpoint" else spec, replace(GPU, cuda_graphs=graphs))
    assert (gpu.runner.graphs is not None) == (graphs and spec == "checkpoint")
    assert gpu.runner.model.embed.weight.dtype == torch.bfloat16 and gpu.runner.cache.k.is_cuda
    batch = prompts(cpu.model_config.vocab_size)
    expected, got = prompt_logits(cpu, batch), prompt_logits(gpu, batch).float()
    offset = 0
    for prompt in batch:
        rows = slice(offset, offset + len(prompt))
        error = (got[rows] - expected[rows]).norm() / expected[rows].norm()
        assert error < LOGIT_RTOL, f"prompt of {len(prompt)}: relative logit error {error:.3g}"
        offset += len(prompt)
    cpu_tokens, gpu_tokens = generate(cpu, batch), generate(gpu, batch)
    for prompt, want, have in zip(batch, cpu_tokens, gpu_tokens, strict=True):
        assert len(have) == NEW_TOKENS
        parted = next((i for i, (a, b) in enumerate(zip(want, have, strict=True)) if a != b), None)
        if parted is None:
            continue
        # The first token told apart must be a near-tie on the CPU, given the same context up to it.
        logits = prompt_logits(cpu, [prompt + want[:parted]])[-1]
        margin = (logits[want[parted]] - logits[have[parted]]).item()
        assert margin < TIE * logits.std().item(), f"token {parted} parts with a float32 margin of {margin:.3g}"


def test_model_forward_needs_no_host_sync_once_planned(checkpoint: Path) -> None:
    """A lone instance's forward (attention planned, MoE counts on the device) never waits for the device: what a
    CUDA graph of it needs. The first forward plans the step's attention; the second must issue no synchronisation."""
    engine = Engine.from_spec(str(checkpoint), GPU)
    for i, prompt in enumerate(prompts(engine.model_config.vocab_size)):
        engine.add_request(f"s{i}", prompt, SamplingParams(temperature=0, max_tokens=4), lambda _: None)
    engine.step()  # prefill; the next step decodes
    engine.flush()  # its token read: the step planned next feeds it, not a placeholder
    planned = engine.plan_step(engine.scheduler.schedule())
    assert planned is not None
    inputs, _ = planned
    with torch.inference_mode():
        engine.runner.eager(inputs)  # stores the same K, V again on the second call
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            engine.runner.eager(inputs)
        finally:
            torch.cuda.set_sync_debug_mode("default")
