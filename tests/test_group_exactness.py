"""A decode group (expert-parallel MoE over gloo, data-parallel attention) gives the tokens of one instance.

Groups of 2 and 4 CPU processes; requests of different lengths that finish at different steps; some instances idle
(they still join every step, because their experts serve the others' tokens).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import Qwen3MoeForCausalLM

from nanocp.checkpoint import write_random_checkpoint
from nanocp.harness.offline_group import OfflineRequest, run_alone, run_group
from nanocp.model_config import ModelConfigError, load_model_config
from nanocp.worker.engine import Engine, EngineConfig
from nanocp.worker.model import ExpertShard
from nanocp.worker.request import SamplingParams
from nanocp.worker.weights import build_model

CONFIG = EngineConfig(page_size=8, num_pages=128, max_step_tokens=32, max_running=8)  # prefill is chunked
SHAPES = [(5, 20), (40, 7), (70, 15), (3, 30), (100, 9), (17, 12)]  # (prompt tokens, new tokens)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_checkpoint(tmp_path_factory.mktemp("qwen3moe"), seed=2)


@pytest.fixture(scope="module")
def requests(checkpoint: Path) -> list[OfflineRequest]:
    vocab = load_model_config(str(checkpoint)).vocab_size
    generator = torch.Generator().manual_seed(5)
    return [
        OfflineRequest(f"r{i}", torch.randint(0, vocab, (n,), generator=generator).tolist(), greedy(m))
        for i, (n, m) in enumerate(SHAPES)
    ]


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens)


@pytest.fixture(scope="module")
def single_instance(checkpoint: Path, requests: list[OfflineRequest]) -> dict[str, list[int]]:
    return run_alone(Engine.from_spec(str(checkpoint), CONFIG), requests)


def test_single_instance_matches_transformers(
    checkpoint: Path, requests: list[OfflineRequest], single_instance: dict[str, list[int]]
) -> None:
    hf = Qwen3MoeForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    for r in requests:
        n = r.params.max_tokens
        expected = hf.generate(torch.tensor([r.prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
        assert single_instance[r.request_id] == expected[0, len(r.prompt) :].tolist(), r.request_id


@pytest.mark.parametrize(
    "layout",
    [
        pytest.param([[0, 1, 2, 3, 4, 5], []], id="2-ranks-one-idle"),
        pytest.param([[0, 2, 4], [1, 3, 5]], id="2-ranks-both-busy"),
        pytest.param([[0, 1], [2], [], [3, 4, 5]], id="4-ranks-one-idle"),
    ],
)
def test_group_tokens_equal_the_single_instance(
    checkpoint: Path,
    requests: list[OfflineRequest],
    single_instance: dict[str, list[int]],
    layout: list[list[int]],
) -> None:
    results = run_group(str(checkpoint), CONFIG, [[requests[i] for i in rank] for rank in layout])
    for rank, indices in zip(results, layout, strict=True):
        assert set(rank.tokens) == {requests[i].request_id for i in indices}, "each request is served at its home"
        for i in indices:
            rid = requests[i].request_id
            assert rank.tokens[rid] == single_instance[rid], f"{rid} at rank {rank.rank}"
    steps = {len(r.steps) for r in results}
    assert len(steps) == 1, f"every rank runs every step of the group, idle or not: {steps}"


def test_experts_that_do_not_split_evenly_are_refused_at_start() -> None:
    with pytest.raises(ModelConfigError, match="8 experts cannot be split evenly over a group of 3"):
        build_model(load_model_config("tiny"), "cpu", shard=ExpertShard(0, 3))
