"""Engine behaviour on the tiny preset: sampling, stopping, batching under a token budget, pages and refusals."""

from __future__ import annotations

import pytest

from nanocp.worker.engine import Engine, EngineConfig
from nanocp.worker.request import EngineError, FinishReason, RequestOutput, SamplingParams


class Collector:
    def __init__(self) -> None:
        self.tokens: dict[str, list[int]] = {}
        self.finish: dict[str, FinishReason] = {}

    def __call__(self, out: RequestOutput) -> None:
        self.tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
        if out.finish_reason is not None:
            self.finish[out.request_id] = out.finish_reason


def run(engine: Engine) -> int:
    steps = 0
    while engine.has_work():
        # A step runs, or (reading the last tokens in flight) it leaves no work.
        assert engine.step() or not engine.has_work(), "an engine with work must make progress"
        steps += 1
    return steps


def make(**config: int) -> Engine:
    return Engine.from_spec("tiny", EngineConfig(**config))


@pytest.fixture(scope="module")
def tiny() -> Engine:
    return make(page_size=4, num_pages=64, max_step_tokens=32, max_running=8)


def generate(engine: Engine, prompt: list[int], **params: object) -> tuple[list[int], FinishReason]:
    sink = Collector()
    engine.add_request("r", prompt, SamplingParams(**params), sink)  # type: ignore[arg-type]
    run(engine)
    return sink.tokens["r"], sink.finish["r"]


def test_same_seed_gives_same_sampled_tokens_and_other_seeds_differ(tiny: Engine) -> None:
    a, _ = generate(tiny, [1, 2, 3], temperature=1.0, seed=5, max_tokens=24, ignore_eos=True)
    b, _ = generate(tiny, [1, 2, 3], temperature=1.0, seed=5, max_tokens=24, ignore_eos=True)
    c, _ = generate(tiny, [1, 2, 3], temperature=1.0, seed=6, max_tokens=24, ignore_eos=True)
    assert a == b
    assert a != c


@pytest.mark.parametrize("params", [{"top_k": 1}, {"top_p": 1e-6}], ids=["top_k=1", "tiny-top_p"])
def test_filters_that_keep_one_token_equal_greedy(tiny: Engine, params: dict[str, float]) -> None:
    greedy, _ = generate(tiny, [9, 8, 7], temperature=0.0, max_tokens=12, ignore_eos=True)
    filtered, _ = generate(tiny, [9, 8, 7], temperature=1.5, seed=1, max_tokens=12, ignore_eos=True, **params)
    assert filtered == greedy


def test_stops_at_max_tokens_with_length(tiny: Engine) -> None:
    tokens, reason = generate(tiny, [4, 5], temperature=0.0, max_tokens=7, ignore_eos=True)
    assert len(tokens) == 7 and reason is FinishReason.LENGTH


def test_stop_token_ends_the_stream_and_is_its_last_token(tiny: Engine) -> None:
    free_run, _ = generate(tiny, [4, 5], temperature=0.0, max_tokens=10, ignore_eos=True)
    stop = free_run[3]
    tokens, reason = generate(tiny, [4, 5], temperature=0.0, max_tokens=10, stop_token_ids=(stop,), ignore_eos=True)
    assert reason is FinishReason.STOP
    assert tokens == free_run[: free_run.index(stop) + 1]


def test_each_step_stays_within_the_token_budget_and_decodes_go_first() -> None:
    engine = make(page_size=4, num_pages=256, max_step_tokens=16, max_running=4)
    sink = Collector()
    engine.add_request("short", [1] * 3, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), sink)
    engine.step()  # short is decoding from now on
    engine.add_request("long", [2] * 100, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True), sink)
    while engine.has_work():
        chunks = engine.scheduler.schedule()
        assert sum(c.num_tokens for c in chunks) <= 16
        if any(c.request.request_id == "short" for c in chunks):
            assert chunks[0].request.request_id == "short", "the decode is scheduled before the prefill chunk"
        engine.run_chunks(chunks)
    assert len(sink.tokens["short"]) == 20 and len(sink.tokens["long"]) == 2


def test_abort_frees_pages_and_other_requests_continue(tiny: Engine) -> None:
    sink = Collector()
    for rid in ("a", "b"):
        tiny.add_request(rid, [3] * 30, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True), sink)
    tiny.step()
    tiny.step()
    assert tiny.load().pages_in_use > 0
    assert tiny.abort("a")
    assert not tiny.abort("a"), "a finished request is gone"
    assert sink.finish["a"] is FinishReason.ABORT
    run(tiny)
    assert len(sink.tokens["b"]) == 40
    load = tiny.load()
    assert load.pages_in_use == 0 and load.pages_committed == 0


def test_request_waits_until_pages_free_up() -> None:
    engine = make(page_size=4, num_pages=20, max_step_tokens=64, max_running=8)
    sink = Collector()
    params = SamplingParams(temperature=0, max_tokens=41, ignore_eos=True)  # 40 + 41 - 1 tokens: all 20 pages
    engine.add_request("first", [1] * 40, params, sink)
    engine.add_request("second", [2] * 40, params, sink)
    engine.step()
    assert engine.load().running == 1 and engine.load().waiting == 1
    run(engine)
    assert sink.finish == {"first": FinishReason.LENGTH, "second": FinishReason.LENGTH}


@pytest.mark.parametrize(
    ("prompt", "params", "code", "words"),
    [
        ([], {}, "INVALID_ARGUMENT", "empty"),
        ([1, 384], {}, "INVALID_ARGUMENT", "vocabulary [0, 384)"),
        ([1], {"max_tokens": 0}, "INVALID_ARGUMENT", "max_tokens"),
        ([1] * 4000, {"max_tokens": 200}, "INVALID_ARGUMENT", "context of 4096"),
        ([1], {"temperature": -1.0}, "INVALID_ARGUMENT", "temperature"),
        ([1], {"top_p": 0.0}, "INVALID_ARGUMENT", "top_p"),
        ([1] * 300, {"max_tokens": 100}, "RESOURCE_EXHAUSTED", "64 pages"),
    ],
)
def test_refused_requests_name_the_problem(
    tiny: Engine, prompt: list[int], params: dict[str, float], code: str, words: str
) -> None:
    with pytest.raises(EngineError) as refused:
        tiny.add_request("bad", prompt, SamplingParams(**params), Collector())  # type: ignore[arg-type]
    assert refused.value.code == code
    assert words in str(refused.value)
    assert not tiny.has_work()


def test_duplicate_live_request_id_is_refused(tiny: Engine) -> None:
    tiny.add_request("dup", [1], SamplingParams(max_tokens=5), Collector())
    with pytest.raises(EngineError) as refused:
        tiny.add_request("dup", [1], SamplingParams(max_tokens=5), Collector())
    assert refused.value.code == "ALREADY_EXISTS"
    run(tiny)
