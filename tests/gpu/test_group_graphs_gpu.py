"""A group's decode steps as CUDA graphs, on one GPU: a group of size 1 over NCCL takes the routing layer's path (the
MoE route's fixed-capacity all-to-all runs through NCCL inside the graph), captures and replays its steps, and a
replay equals the same padded step run eagerly. The forward has no host sync, and replays reuse the buffers the
graphs captured. (CP routes need a second GPU: tests/gpu/multi.)

Skips without CUDA. On the GPU machine: python3 -m pytest --noconftest -q tests/gpu.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from nanocp.checkpoint import write_random_checkpoint
from nanocp.harness.offline_group import free_port
from nanocp.worker import routing
from nanocp.worker.attention import StaticPlan
from nanocp.worker.engine import Engine, EngineConfig
from nanocp.worker.request import RequestOutput, SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CONFIG = EngineConfig(
    page_size=16, num_pages=128, max_step_tokens=256, max_running=8, graph_max_batch=4, device="cuda", dtype="bfloat16"
)
MAX_TOKENS = (12, 5, 9)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_checkpoint(tmp_path_factory.mktemp("qwen3moe"), seed=4, head_dim=64)


@pytest.fixture(scope="module")
def nccl_group_of_one() -> Iterator[None]:
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    torch.cuda.set_device(0)
    yield
    dist.destroy_process_group()


def generate(engine: Engine) -> dict[str, list[int]]:
    outputs: dict[str, list[int]] = {}

    def collect(out: RequestOutput) -> None:
        outputs.setdefault(out.request_id, []).extend(out.new_token_ids)

    generator = torch.Generator().manual_seed(5)
    for i, max_tokens in enumerate(MAX_TOKENS):
        prompt = torch.randint(0, engine.model_config.vocab_size, (20 + 13 * i,), generator=generator).tolist()
        engine.add_request(f"r{i}", prompt, SamplingParams(temperature=0, max_tokens=max_tokens), collect)
    while engine.step():
        pass
    assert engine.store.pool.num_in_use == 0, "every page comes back"
    return outputs


def test_a_group_of_one_replays_graphs_through_the_routing_layer(checkpoint: Path, nccl_group_of_one: None) -> None:
    assert routing.grouped(), "the MoE takes the routed path"
    graphed = Engine.from_spec(str(checkpoint), CONFIG)
    graphs = graphed.runner.graphs
    assert graphs is not None and sorted(graphs.buckets) == [(1, False), (2, False), (4, False)]
    replayed = generate(graphed)
    padded_eager = Engine.from_spec(str(checkpoint), CONFIG)
    assert padded_eager.runner.graphs is not None
    padded_eager.runner.graphs.replay = False
    assert generate(padded_eager) == replayed
    assert [len(replayed[f"r{i}"]) for i in range(len(MAX_TOKENS))] == list(MAX_TOKENS)
    assert graphs.replays == max(MAX_TOKENS) - 1, "every decode step replays; the prefill runs eagerly"
    assert graphed.runner.eager_steps == {"prefill": 1}


def test_replays_reuse_the_captured_buffers_and_the_forward_never_syncs(
    checkpoint: Path, nccl_group_of_one: None
) -> None:
    engine = Engine.from_spec(str(checkpoint), CONFIG)
    graphs = engine.runner.graphs
    assert graphs is not None
    for i in range(2):
        params = SamplingParams(temperature=0, max_tokens=8)
        engine.add_request(f"s{i}", list(range(1, 30 + i)), params, lambda _: None)
    engine.step()  # prefill; what follows decodes
    engine.flush()  # its token read: the step planned next feeds it, not a placeholder
    planned = engine.plan_step(engine.scheduler.schedule())
    assert planned is not None
    inputs, _ = planned
    assert isinstance(inputs.plan, StaticPlan) and inputs.plan.rows == 2
    with torch.inference_mode():
        bucket = graphs.prepare(inputs)
        captured = graphs.run(bucket)
        torch.cuda.synchronize()
        allocated = torch.cuda.memory_allocated()
        for _ in range(3):
            assert graphs.run(bucket) is captured, "a replay writes the buffer its graph captured"
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated() == allocated, "replays allocate nothing"
        graphs.replay = False
        torch.cuda.set_sync_debug_mode("error")
        try:
            graphs.run(bucket)  # the step the graph holds, eagerly, through NCCL's all-to-alls: it never syncs
        finally:
            torch.cuda.set_sync_debug_mode("default")
            graphs.replay = True
