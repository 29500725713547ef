"""Decode steps replayed as CUDA graphs compute exactly what the same padded steps compute eagerly, steps a graph
can't take run eagerly and are counted, and graphs capture a bucket per batch size ladder rung.

Skips without CUDA. On the GPU machine: python3 -m pytest --noconftest -q tests/gpu.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nanocp.checkpoint import write_random_checkpoint
from nanocp.worker.cuda_graphs import bucket_sizes
from nanocp.worker.engine import Engine, EngineConfig
from nanocp.worker.request import RequestOutput, SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# Requests end at different steps, so the batch shrinks 5 -> 4 -> 3 -> 2 -> 1 and crosses buckets; with graphs up to
# batch 4, the steps of 5 rows (and the prefill) run eagerly.
MAX_TOKENS = (40, 9, 17, 30, 24)
PROMPT_LENGTHS = (5, 17, 40, 63, 100)
CONFIG = EngineConfig(
    page_size=16, num_pages=128, max_step_tokens=512, max_running=8, graph_max_batch=4, device="cuda", dtype="bfloat16"
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_checkpoint(tmp_path_factory.mktemp("qwen3moe"), seed=3, head_dim=64)


def generate(engine: Engine) -> dict[str, list[int]]:
    outputs: dict[str, list[int]] = {}

    def collect(out: RequestOutput) -> None:
        outputs.setdefault(out.request_id, []).extend(out.new_token_ids)

    generator = torch.Generator().manual_seed(11)
    for i, (length, max_tokens) in enumerate(zip(PROMPT_LENGTHS, MAX_TOKENS, strict=True)):
        prompt = torch.randint(0, engine.model_config.vocab_size, (length,), generator=generator).tolist()
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        engine.add_request(f"r{i}", prompt, params, collect)
    while engine.step():
        pass
    assert engine.store.pool.num_in_use == 0, "every page comes back"
    return outputs


def test_bucket_ladder() -> None:
    assert bucket_sizes(1) == [1]
    assert bucket_sizes(4) == [1, 2, 4]
    assert bucket_sizes(40) == [1, 2, 4, 8, 16, 32, 40]
    assert bucket_sizes(256)[-3:] == [224, 240, 256]


def test_replay_equals_padded_eager_and_overflow_runs_eagerly(checkpoint: Path) -> None:
    graphed = Engine.from_spec(str(checkpoint), CONFIG)
    assert graphed.runner.graphs is not None and graphed.runner.graphs.sizes == [1, 2, 4]
    replayed = generate(graphed)
    padded_eager = Engine.from_spec(str(checkpoint), CONFIG)
    assert padded_eager.runner.graphs is not None
    padded_eager.runner.graphs.replay = False
    eager = generate(padded_eager)
    assert replayed == eager
    assert [len(replayed[f"r{i}"]) for i in range(len(MAX_TOKENS))] == list(MAX_TOKENS)
    # Decode steps of 4 rows or fewer replay (bucket 4: 4 rows from the step after the 2nd request ends).
    assert graphed.runner.graphs.replays == max(MAX_TOKENS) - sorted(MAX_TOKENS)[0]
    assert graphed.runner.eager_steps["batch beyond the largest graph"] == sorted(MAX_TOKENS)[0] - 1
    assert graphed.runner.eager_steps["prefill"] == 1


def test_graphs_are_off_where_unsupported(checkpoint: Path) -> None:
    assert Engine.from_spec(str(checkpoint), EngineConfig(device="cuda", dtype="float32")).runner.graphs is None
    assert Engine.from_spec("tiny", EngineConfig(device="cuda", dtype="bfloat16")).runner.graphs is None  # heads of 16
    off = EngineConfig(device="cuda", dtype="bfloat16", cuda_graphs=False)
    assert Engine.from_spec(str(checkpoint), off).runner.graphs is None
