"""The overlap scheduler (EngineConfig.overlap): a step is launched before the one in flight is read, its decodes fed
their pending tokens as placeholders resolved on the device. On the CPU nothing runs apart from the host, but the
bookkeeping is the GPU's: streams, finishes, pages and the group's CP routes must equal steps read at once.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from test_dcp_exactness import LAYOUTS, split

from nanocp.harness.offline_group import OfflineRequest, run_alone, run_group
from nanocp.worker.engine import Engine, EngineConfig
from nanocp.worker.request import FinishReason, RequestOutput, SamplingParams

CONFIG = EngineConfig(page_size=4, num_pages=128, max_step_tokens=24, max_running=8)


SHAPES = [(5, 9, 0.0), (30, 14, 0.0), (11, 6, 0.9), (47, 11, 1.2), (3, 1, 0.0), (19, 16, 0.7)]  # (prompt, new, T)
CP_SHAPES = [(40, 9, 0.0), (30, 14, 0.0), (51, 6, 0.9), (47, 11, 1.2), (60, 3, 0.0), (19, 16, 0.7)]  # pages to split


def requests(
    vocab: int, stop: int | None = None, shapes: list[tuple[int, int, float]] = SHAPES
) -> list[OfflineRequest]:
    """Greedy and seeded sampled requests, prompts chunked over several steps; with `stop`, that token ends them."""
    generator = torch.Generator().manual_seed(3)
    stops = (stop,) if stop is not None else ()
    return [
        OfflineRequest(
            f"r{i}",
            torch.randint(0, vocab, (n,), generator=generator).tolist(),
            SamplingParams(temperature=t, seed=i, max_tokens=m, stop_token_ids=stops, ignore_eos=True),
        )
        for i, (n, m, t) in enumerate(shapes)
    ]


def stream(overlap: bool, batch: list[OfflineRequest]) -> tuple[dict[str, list[RequestOutput]], Engine]:
    engine = Engine.from_spec("tiny", replace(CONFIG, overlap=overlap))
    outputs: dict[str, list[RequestOutput]] = {}
    for r in batch:
        engine.add_request(
            r.request_id, r.prompt, r.params, lambda out: outputs.setdefault(out.request_id, []).append(out)
        )
    while engine.step():
        pass
    return outputs, engine


def a_common_token(outputs: dict[str, list[RequestOutput]]) -> int:
    """A token that several requests generate mid-stream: as a stop token it ends them early, at different steps."""
    counts: dict[int, int] = {}
    for outs in outputs.values():
        for token in {t for out in outs[1:-1] for t in out.new_token_ids}:
            counts[token] = counts.get(token, 0) + 1
    return max(counts, key=counts.__getitem__)


@pytest.mark.parametrize("with_stop", [False, True], ids=["to-max-tokens", "stop-tokens"])
def test_overlapped_steps_stream_what_steps_read_at_once_stream(with_stop: bool) -> None:
    vocab = Engine.from_spec("tiny", CONFIG).model_config.vocab_size
    batch = requests(vocab)
    if with_stop:  # a stop token is only known once read: the overlapped engine has already launched a step more
        batch = requests(vocab, a_common_token(stream(False, batch)[0]))
    at_once, _ = stream(False, batch)
    overlapped, engine = stream(True, batch)
    assert overlapped == at_once, "the same outputs: tokens, one per output, finish reasons, completion counts"
    if with_stop:
        assert any(outs[-1].finish_reason is FinishReason.STOP for outs in at_once.values())
    load = engine.load()
    assert (load.running, load.pages_in_use, load.pages_committed) == (0, 0, 0), "every page back"


def test_a_steps_tokens_are_read_after_the_next_step_is_launched() -> None:
    engine = Engine.from_spec("tiny", replace(CONFIG, overlap=True))
    outputs: list[RequestOutput] = []
    engine.add_request("r", [1, 2, 3], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), outputs.append)
    assert engine.step() and outputs == [], "the prefill sampled a token the host has not read"
    assert engine.requests["r"].pending == 1
    assert engine.step() and [o.completion_tokens for o in outputs] == [1], "read once the decode was launched"
    engine.flush()
    assert [o.completion_tokens for o in outputs] == [1, 2] and engine.requests["r"].pending == 0


def test_an_abort_with_a_token_in_flight_drops_it_and_frees_the_pages() -> None:
    engine = Engine.from_spec("tiny", replace(CONFIG, overlap=True))
    outputs: dict[str, list[RequestOutput]] = {}

    def collect(out: RequestOutput) -> None:
        outputs.setdefault(out.request_id, []).append(out)

    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    engine.add_request("aborted", [4, 5, 6], params, collect)
    engine.add_request("bystander", [4, 5, 6], params, collect)
    for _ in range(3):
        engine.step()
    assert engine.abort("aborted")
    while engine.step():
        pass
    last = outputs["aborted"][-1]
    streamed = sum(len(o.new_token_ids) for o in outputs["aborted"])
    assert last.finish_reason is FinishReason.ABORT and last.completion_tokens == streamed, "counts what it streamed"
    assert [t for o in outputs["bystander"] for t in o.new_token_ids][:streamed] == [
        t for o in outputs["aborted"] for t in o.new_token_ids
    ], "the same prompt, the same tokens up to the abort"
    assert outputs["bystander"][-1].finish_reason is FinishReason.LENGTH
    assert engine.load().pages_in_use == 0


@pytest.mark.parametrize("static", [False, True], ids=["dynamic-layout", "static-layout"])
def test_a_cp_group_overlapping_its_steps_gives_the_tokens_of_one_instance(static: bool) -> None:
    """Requests at CP degrees 1 to 4 on a group of 4, some ending at a stop token (their last launched step still
    routes their rows to the holders, which free the shards a step later)."""
    vocab = Engine.from_spec("tiny", CONFIG).model_config.vocab_size
    batch = requests(vocab, shapes=CP_SHAPES)
    batch = requests(vocab, a_common_token(stream(False, batch)[0]), CP_SHAPES)
    config = replace(CONFIG, page_size=8, num_pages=256, max_step_tokens=48)
    alone = run_alone(Engine.from_spec("tiny", config), batch)
    assert any(len(alone[r.request_id]) < r.params.max_tokens for r in batch), "some end at the stop token"
    by_rank: list[list[OfflineRequest]] = [[] for _ in range(4)]
    for r, (home, holders) in zip(batch, LAYOUTS["mixed-degrees"], strict=True):
        shards = split(len(r.prompt), r.params.max_tokens, holders)
        by_rank[home].append(replace(r, shards=shards))
    results = run_group("tiny", replace(config, overlap=True, static_decode=static, graph_max_batch=4), by_rank)
    assert {rid: t for rank in results for rid, t in rank.tokens.items()} == alone
    assert all(r.pages_in_use == 0 and r.pages_committed == 0 for r in results), "every holder freed every shard"
