"""A decode group of 2 and 4 GPUs (one process and one GPU a rank, NCCL between them) against a lone instance, with
requests placed at CP degrees 1 to N on instances other than their homes (the placements of
tests/test_dcp_exactness.py, whose requests, layouts and shard split this reuses).

- float32 (the reference attention and experts on the GPU, eager): the group's greedy tokens equal a lone float32
  GPU instance's exactly, for every placement, with the dynamic layout and with the graph buckets' static layout
  run eagerly (fixed-slot CP routes through the routing layer, the query route overlapped).
- bf16 with CUDA graphs (FlashInfer attention, decode steps of the whole group replayed, CP routes inside them): a
  replay computes exactly what the same padded step computes eagerly (`graphs.replay = False`: identical tokens);
  against the float32 lone instance, tokens are equal up to the first token where they part, which must be a
  near-tie in float32 (tests/gpu/test_engine_gpu.py's criterion: bf16 rounding moves logits, a CP split moves them
  differently again, and random models have many near-ties). A MoE model has a second kind: when two experts' gate
  probabilities for the parting token nearly tie in some layer, rounding can swap the expert, and that token's logits
  jump by far more than rounding (seen on CPU: a gap of 0.4% swaps an expert and moves the logits by half their
  standard deviation), so a parting there is a near-tie too. The same holds for the padded step without graphs
  (`cuda_graphs=False, static_decode=True`) and for the dynamic eager layout.

Skips unless there are N GPUs. NANOCP_MULTI_DEVICE=cpu runs the same on CPU processes over gloo (the bf16 modes take
the static layout eagerly there), to check the test itself where no GPUs are.
"""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/: the CPU suite's placements
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/gpu: the bf16 criterion
import test_dcp_exactness as cpu_dcp
from test_engine_gpu import TIE, prompt_logits

from nanocp.checkpoint import write_random_checkpoint
from nanocp.harness.offline_group import OfflineRequest, RankResult, run_group
from nanocp.worker.engine import Engine, EngineConfig
from nanocp.worker.model import SparseMoE
from nanocp.worker.request import RequestOutput, SamplingParams

DEVICE = os.environ.get("NANOCP_MULTI_DEVICE", "cuda")
ON_GPU = DEVICE == "cuda"
TIMEOUT_S = 300.0  # a group's whole run: start, NCCL, graph capture, every request
FLOAT32 = EngineConfig(
    page_size=cpu_dcp.PAGE, num_pages=256, max_step_tokens=48, max_running=8, device=DEVICE, dtype="float32"
)
# Graph buckets of 1, 2 and 4 rows, each with and without CP routes; ranks hold at most 3 requests.
BF16 = replace(FLOAT32, dtype="bfloat16", graph_max_batch=4)
BF16_MODES = {
    "graphs": replace(BF16, static_decode=not ON_GPU),  # on CPU: the layout the graphs replay, eagerly
    "padded-eager": replace(BF16, cuda_graphs=False, static_decode=True),
    "dynamic-eager": replace(BF16, cuda_graphs=False),
}

# (home, holders) per request of cpu_dcp.SHAPES, for groups of 2; groups of 4 take cpu_dcp.LAYOUTS.
LAYOUTS_2 = {
    "degree-1-remote": [(0, [1]), (1, [0]), (0, [1]), (1, [0]), (0, [0]), (1, [0])],
    "degree-2": [(0, [0, 1]), (1, [1, 0]), (0, [1, 0]), (1, [0, 1]), (0, [0, 1]), (1, [1, 0])],
    "mixed-degrees": [(0, [0]), (1, [0, 1]), (0, [1]), (1, [1]), (0, [1, 0]), (1, [0])],
}
LAYOUTS = {2: LAYOUTS_2, 4: cpu_dcp.LAYOUTS}
# Gate probabilities of the k-th and (k+1)-th expert closer than this (relative to the k-th) are a near-tie.
ROUTER_TIE = 0.05


def needs(gpus: int) -> pytest.MarkDecorator:
    return pytest.mark.skipif(ON_GPU and torch.cuda.device_count() < gpus, reason=f"needs {gpus} CUDA GPUs")


def cases(*layouts: str, extra: tuple[object, ...] = ()) -> list[object]:
    """pytest params (size, layout, *extra) for groups of 2 and 4; "degree-N" names the group's size; no layout:
    every layout."""
    chosen = []
    for size in (2, 4):
        names = [name.replace("degree-N", f"degree-{size}") for name in layouts] or list(LAYOUTS[size])
        suffix = "".join(f"-{e}" for e in extra)
        chosen += [
            pytest.param(size, name, *extra, marks=needs(size), id=f"{size}-gpus-{name}{suffix}") for name in names
        ]
    return chosen


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Heads of 64: FlashInfer's, so bf16 steps run its kernels and take graphs.
    return write_random_checkpoint(tmp_path_factory.mktemp("qwen3moe"), seed=3, head_dim=64)


@pytest.fixture(scope="module")
def requests() -> list[tuple[list[int], SamplingParams]]:
    return cpu_dcp.make_requests()


@pytest.fixture(scope="module")
def reference(checkpoint: Path) -> Engine:
    """The lone float32 instance, on the first GPU."""
    return Engine.from_spec(str(checkpoint), replace(FLOAT32, device=reference_device()))


@pytest.fixture(scope="module")
def scorer(checkpoint: Path) -> Engine:
    """A lone float32 instance whose steps take a whole prompt and the tokens after it (prompt_logits reads the last
    row of one step)."""
    return Engine.from_spec(str(checkpoint), replace(FLOAT32, max_step_tokens=256, device=reference_device()))


def reference_device() -> str:
    return "cuda:0" if ON_GPU else "cpu"


@pytest.fixture(scope="module")
def expected(reference: Engine, requests: list[tuple[list[int], SamplingParams]]) -> list[list[int]]:
    tokens: dict[str, list[int]] = {}

    def collect(out: RequestOutput) -> None:
        tokens.setdefault(out.request_id, []).extend(out.new_token_ids)

    for i, (prompt, params) in enumerate(requests):
        reference.add_request(f"r{i}", prompt, params, collect)
    while reference.step():
        pass
    return [tokens[f"r{i}"] for i in range(len(requests))]


_runs: dict[tuple[int, str, str], tuple[dict[str, list[int]], list[RankResult]]] = {}


def run(
    checkpoint: Path,
    requests: list[tuple[list[int], SamplingParams]],
    size: int,
    layout: str,
    mode: str,
    config: EngineConfig,
) -> tuple[dict[str, list[int]], list[RankResult]]:
    """Each request at its home with its shards over the group; the tokens by request id (runs are cached by
    (size, layout, mode), so tests share them). Every holder frees every shard."""
    key = (size, layout, mode)
    if key not in _runs:
        by_rank: list[list[OfflineRequest]] = [[] for _ in range(size)]
        for i, ((prompt, params), (home, holders)) in enumerate(zip(requests, LAYOUTS[size][layout], strict=True)):
            shards = cpu_dcp.split(len(prompt), params.max_tokens, holders)
            by_rank[home].append(OfflineRequest(f"r{i}", prompt, params, shards))
        setup = padded_eager if mode == "graphs-replay-off" else None
        results = run_group(str(checkpoint), config, by_rank, timeout_s=TIMEOUT_S, setup=setup)
        assert all(r.pages_in_use == 0 and r.pages_committed == 0 for r in results), "every holder freed every shard"
        _runs[key] = ({rid: t for r in results for rid, t in r.tokens.items()}, results)
    return _runs[key]


def padded_eager(engine: Engine) -> None:
    """Each rank runs its graph buckets' padded steps eagerly instead of replaying them (a setup hook of run_group)."""
    if engine.runner.graphs is not None:
        engine.runner.graphs.replay = False


@pytest.mark.parametrize(
    ("size", "layout", "static"),
    cases(extra=("dynamic",)) + cases("degree-N", "mixed-degrees", extra=("static",)),
)
def test_float32_group_gives_the_tokens_of_one_instance(
    checkpoint: Path,
    requests: list[tuple[list[int], SamplingParams]],
    expected: list[list[int]],
    size: int,
    layout: str,
    static: str,
) -> None:
    """static: decode steps take the graph buckets' layout, run eagerly (float32 takes no graphs)."""
    config = replace(FLOAT32, static_decode=static == "static", graph_max_batch=4)
    tokens, _ = run(checkpoint, requests, size, layout, f"float32-{static}", config)
    for i, want in enumerate(expected):
        assert tokens[f"r{i}"] == want, f"request {i} placed {LAYOUTS[size][layout][i]}"


@pytest.mark.parametrize(("size", "layout"), cases("mixed-degrees"))
def test_a_replay_equals_the_same_padded_step_run_eagerly(
    checkpoint: Path, requests: list[tuple[list[int], SamplingParams]], size: int, layout: str
) -> None:
    replayed, results = run(checkpoint, requests, size, layout, "graphs", BF16_MODES["graphs"])
    eager, _ = run(checkpoint, requests, size, layout, "graphs-replay-off", BF16_MODES["graphs"])
    assert eager == replayed
    assert all(len(replayed[f"r{i}"]) == params.max_tokens for i, (_, params) in enumerate(requests))
    if ON_GPU:
        assert all(r.graph_replays > 0 for r in results), "every rank replays its decode steps"
        assert len({r.graph_replays for r in results}) == 1, "the ranks replay together"
        assert {why for r in results for why in r.eager_steps} <= {"prefill"}, "only steps with a prefill run eagerly"


@pytest.mark.parametrize(
    ("size", "layout", "mode"),
    cases("degree-1-remote", "degree-N", "mixed-degrees", extra=("graphs",))
    + cases("mixed-degrees", extra=("padded-eager",))
    + cases("mixed-degrees", extra=("dynamic-eager",)),
)
def test_bf16_group_parts_from_float32_only_at_near_ties(
    checkpoint: Path,
    requests: list[tuple[list[int], SamplingParams]],
    scorer: Engine,
    expected: list[list[int]],
    size: int,
    layout: str,
    mode: str,
) -> None:
    """The eager modes run the mixed layout only (CP degrees 1 to N at once)."""
    tokens, _ = run(checkpoint, requests, size, layout, mode, BF16_MODES[mode])
    for i, ((prompt, params), want) in enumerate(zip(requests, expected, strict=True)):
        have = tokens[f"r{i}"]
        assert len(have) == params.max_tokens
        parted = next((j for j, (a, b) in enumerate(zip(want, have, strict=True)) if a != b), None)
        if parted is None:
            continue
        # The first token told apart must be a near-tie in float32, given the same context up to it: of its logits,
        # or of its experts in some layer.
        context = prompt + want[:parted]
        logits = prompt_logits(scorer, [context])[-1]
        margin = (logits[want[parted]] - logits[have[parted]]).item()
        if margin < TIE * logits.std().item():
            continue
        gap = router_gap(scorer, context)
        assert gap < ROUTER_TIE, (
            f"request {i} placed {LAYOUTS[size][layout][i]}: token {parted} parts with a float32 margin of "
            f"{margin:.3g} ({margin / logits.std().item():.2f} standard deviations) and expert gates {gap:.3f} apart"
        )


def router_gap(engine: Engine, context: list[int]) -> float:
    """The smallest gap over layers between the gate probabilities of the k-th and (k+1)-th expert of the context's
    last token, relative to the k-th (k: experts a token), with `engine` prefilling the context whole."""
    gaps: list[float] = []

    def hook(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        assert isinstance(module, SparseMoE)
        probs = F.softmax(module.gate(args[0][-1]).float(), dim=-1).sort(descending=True).values
        k = module.config.experts_per_token
        gaps.append(((probs[k - 1] - probs[k]) / probs[k - 1]).item())

    moes = [m for m in engine.runner.model.modules() if isinstance(m, SparseMoE)]
    handles = [m.register_forward_pre_hook(hook) for m in moes]
    try:
        prompt_logits(engine, [context])
    finally:
        for handle in handles:
            handle.remove()
    assert len(gaps) == len(moes), "one forward, every layer"
    return min(gaps)
