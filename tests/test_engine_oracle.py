"""The engine against transformers on the same random Qwen3-MoE checkpoint: prompt logits and greedy tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import Qwen3MoeForCausalLM

from nanocp.checkpoint import write_random_checkpoint
from nanocp.worker.engine import Engine, EngineConfig
from nanocp.worker.request import RequestOutput, SamplingParams

# float32 on both sides; what differs is only the order of floating-point sums.
LOGIT_ATOL = 1e-4
PROMPT_LENGTHS = (5, 17, 40, 63)
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_checkpoint(tmp_path_factory.mktemp("qwen3moe"), seed=1)


@pytest.fixture(scope="module")
def hf_model(checkpoint: Path) -> Qwen3MoeForCausalLM:
    return Qwen3MoeForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()


def prompts(vocab: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(7)
    return [torch.randint(0, vocab, (n,), generator=generator).tolist() for n in PROMPT_LENGTHS]


def test_prompt_logits_match_transformers_for_a_batch_of_prompts(
    checkpoint: Path, hf_model: Qwen3MoeForCausalLM
) -> None:
    engine = Engine.from_spec(str(checkpoint), EngineConfig(page_size=8, num_pages=64, max_step_tokens=256))
    batch = prompts(engine.model_config.vocab_size)
    for i, prompt in enumerate(batch):
        engine.add_request(f"r{i}", prompt, SamplingParams(temperature=0, max_tokens=1), lambda _: None)
    chunks = engine.scheduler.schedule()
    assert [c.num_tokens for c in chunks] == list(PROMPT_LENGTHS), "the whole batch is one step"
    planned = engine.plan_step(chunks)
    assert planned is not None
    inputs, _ = planned
    with torch.inference_mode():
        logits = engine.runner.model.logits(engine.runner.eager(inputs))
        offset = 0
        for prompt in batch:
            expected = hf_model(torch.tensor([prompt])).logits[0]
            torch.testing.assert_close(logits[offset : offset + len(prompt)], expected, atol=LOGIT_ATOL, rtol=0)
            offset += len(prompt)


@pytest.mark.parametrize("max_step_tokens", [256, 24], ids=["whole-prompts", "chunked-prefill"])
def test_greedy_tokens_equal_transformers_generate(
    checkpoint: Path, hf_model: Qwen3MoeForCausalLM, max_step_tokens: int
) -> None:
    engine = Engine.from_spec(
        str(checkpoint), EngineConfig(page_size=8, num_pages=64, max_step_tokens=max_step_tokens, max_running=8)
    )
    batch = prompts(engine.model_config.vocab_size)
    outputs: dict[str, list[int]] = {}

    def collect(out: RequestOutput) -> None:
        outputs.setdefault(out.request_id, []).extend(out.new_token_ids)

    for i, prompt in enumerate(batch):
        engine.add_request(f"r{i}", prompt, SamplingParams(temperature=0, max_tokens=NEW_TOKENS), collect)
    while engine.has_work():
        engine.step()
    for i, prompt in enumerate(batch):
        expected = hf_model.generate(
            torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False
        )[0, len(prompt) :].tolist()
        assert outputs[f"r{i}"] == expected, f"prompt {i} ({len(prompt)} tokens)"
    assert engine.store.pool.num_free == engine.store.pool.num_pages
