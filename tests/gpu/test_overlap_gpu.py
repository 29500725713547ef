"""The overlap scheduler on a GPU: steps launched before the one in flight is read give the same tokens as steps
read at once (graph replays and eager prefills alike), and neither a steady decode step nor a prefill chunk beside
decodes makes the host wait for the device before it has launched the next step. Skips without CUDA.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from nanocp.checkpoint import write_random_checkpoint
from nanocp.worker.engine import Engine, EngineConfig
from nanocp.worker.request import RequestOutput, SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

GPU = EngineConfig(page_size=16, num_pages=128, max_step_tokens=256, device="cuda", dtype="bfloat16")
PROMPT_LENGTHS = (5, 17, 40, 63, 100, 9)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_checkpoint(tmp_path_factory.mktemp("qwen3moe"), seed=1, head_dim=64)  # FlashInfer heads


def add_batch(engine: Engine, outputs: dict[str, list[RequestOutput]], temperature: float) -> None:
    generator = torch.Generator().manual_seed(5)
    for i, n in enumerate(PROMPT_LENGTHS):
        prompt = torch.randint(0, engine.model_config.vocab_size, (n,), generator=generator).tolist()
        params = SamplingParams(temperature=temperature, seed=i, max_tokens=8 + 3 * i, ignore_eos=True)
        engine.add_request(f"r{i}", prompt, params, lambda out: outputs.setdefault(out.request_id, []).append(out))


@pytest.mark.parametrize("temperature", [0.0, 0.8], ids=["greedy", "sampled"])
def test_overlapped_steps_equal_steps_read_at_once(checkpoint: Path, temperature: float) -> None:
    streams = []
    for overlap in (False, True):
        engine = Engine.from_spec(str(checkpoint), replace(GPU, overlap=overlap))
        assert engine.runner.graphs is not None
        outputs: dict[str, list[RequestOutput]] = {}
        add_batch(engine, outputs, temperature)
        while engine.step():
            pass
        assert engine.runner.graphs.replays > 0
        streams.append(outputs)
    assert streams[1] == streams[0], "the same batches every step, so the same tokens, outputs and finishes"


def steady_decoding(checkpoint: Path) -> Engine:
    """An overlapped engine past its prefills and its first all-decode step (its graph and wrappers warm)."""
    engine = Engine.from_spec(str(checkpoint), replace(GPU, overlap=True))
    outputs: dict[str, list[RequestOutput]] = {}
    add_batch(engine, outputs, temperature=0.8)
    while any(r.prefilling for r in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()
    engine.step()
    return engine


def test_a_steady_decode_step_launches_without_waiting_for_the_device(checkpoint: Path) -> None:
    """Between reading the step before (an event's wait, which torch does not count) nothing in planning,
    launching and sampling a graphed decode step may synchronise: no blocking copy, no read of a device value."""
    engine = steady_decoding(checkpoint)
    replays = engine.runner.graphs.replays if engine.runner.graphs is not None else 0
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            engine.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert engine.runner.graphs is not None and engine.runner.graphs.replays == replays + 3


def test_a_steady_decode_step_copies_nothing_from_pageable_memory(checkpoint: Path) -> None:
    """A copy to the device from pageable memory makes the host wait for the stream to drain, though torch counts
    no synchronisation (a FlashInfer plan from pageable tables did, and so cost every step its overlap): every
    host-to-device copy of a steady step comes from page-locked memory."""
    engine = steady_decoding(checkpoint)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        for _ in range(3):
            engine.step()
        torch.cuda.synchronize()
    copies = [e.name for e in profile.events() if e.name.startswith("Memcpy HtoD")]
    assert copies, "a decode step copies its inputs and tables to the device"
    assert not [name for name in copies if "Pageable" in name], sorted(set(copies))


def test_a_prefill_chunk_beside_decodes_launches_without_waiting_for_the_device(checkpoint: Path) -> None:
    """An eager step (a long prompt's chunk beside graphed decodes' rows) neither synchronises nor copies from
    pageable memory: FlashInfer's plans of decode rows and of prefill chunks did (its decode wrapper's query index
    and its prefill wrapper's key counts), and so cost every prefill step its overlap."""
    engine = steady_decoding(checkpoint)
    prompt = [1 + i % 500 for i in range(3 * GPU.max_step_tokens - 1)]  # three chunks, each beside decodes
    engine.add_request("long", prompt, SamplingParams(temperature=0.0, max_tokens=2), lambda _: None)
    engine.step()  # the first chunk: its shapes' kernels are built and warm
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
            for _ in range(2):
                engine.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    copies = [e.name for e in profile.events() if e.name.startswith("Memcpy HtoD")]
    assert copies and not [name for name in copies if "Pageable" in name], sorted(set(copies))
    long = engine.requests["long"]
    assert long.prefilling and long.num_computed > 2 * GPU.max_step_tokens, "both profiled steps carried a chunk"
