"""Step timing on a GPU: sections record CUDA event pairs, the host never waits for them, and the step log reads them
once the device has passed them (at the next step's exchange in an engine); the straggler test hook's delay shows in
the events; an engine's steps come out timed.

Skips without CUDA. On the GPU machine: python3 -m pytest --noconftest -q tests/gpu/test_step_timing_gpu.py
"""

from __future__ import annotations

import time

import pytest
import torch

from nanocp.harness.delays import DelayedTimer
from nanocp.worker.engine import Engine, EngineConfig
from nanocp.worker.request import RequestOutput, SamplingParams
from nanocp.worker.timing import StepLog, StepRecord, StepTimer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


# Of torch.cuda._sleep: a second or so. The host checks below flip only if the host is paused for half of it, and
# a shared machine pauses a process for up to a few hundred ms.
CYCLES = 2_000_000_000


def busy_seconds() -> float:
    """How long torch.cuda._sleep(CYCLES) keeps the GPU busy, by the device's clock (CUDA events), which no pause of
    the host stretches."""
    torch.cuda._sleep(CYCLES // 10)  # warm-up: the clocks ramp up
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(CYCLES)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def test_a_section_is_timed_by_the_device_and_read_only_once_the_device_has_passed_it() -> None:
    busy = busy_seconds()
    assert busy > 0.4, "long enough to tell waiting from not waiting"
    timer = StepTimer(enabled=True, device="cuda")
    timer.start_step()
    torch.cuda.synchronize()
    begin = time.perf_counter()
    with timer.section("attention"):
        torch.cuda._sleep(CYCLES)
    with timer.section("exchange", host=True):  # work that blocks the host anyway keeps host clocks
        time.sleep(0.001)
    sections, pending = timer.take()
    log = StepLog()
    log.add(StepRecord(1, 1, 0, 0, 0, time.perf_counter() - begin, sections, pending))
    assert log.last() is None, "the device is still busy: no timed step yet, and nobody waited for it"
    assert time.perf_counter() - begin < busy / 2, "the host never waited for the device"
    assert pending is not None and set(sections) == {"exchange"}

    torch.cuda.synchronize()
    record = log.last()
    assert record is not None and record.pending is None
    assert record.sections["attention"] == pytest.approx(busy, rel=0.25)
    assert record.sections["exchange"] >= 0.001


def test_the_straggler_hook_delays_a_section_on_the_device_clock() -> None:
    timer = DelayedTimer({"moe_compute": 0.05}, enabled=True, device="cuda")
    timer.start_step()
    with timer.section("moe_compute"):
        torch.ones(16, device="cuda").sum()
    _, pending = timer.take()
    torch.cuda.synchronize()
    assert pending is not None and pending.ready()
    assert pending.seconds()["moe_compute"] >= 0.05, "the stream idled while the host slept, between the events"


def test_an_engine_on_the_gpu_times_its_steps_with_events() -> None:
    engine = Engine.from_spec("tiny", EngineConfig(page_size=16, num_pages=64, max_step_tokens=64, device="cuda"))
    engine.timer.enabled = True
    outputs: list[RequestOutput] = []
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    engine.add_request("r", [1, 2, 3, 4, 5], params, outputs.append)
    while engine.step():
        pass
    torch.cuda.synchronize()
    assert engine.steps.last() is not None  # reads what is left
    records = engine.steps.after(0)
    assert len(records) == 6 and all(r.pending is None for r in records), "every step's events were read"
    first = records[0]  # the prefill runs eagerly whatever graphs the engine may replay for decodes
    assert first.sections["attention"] > 0 and first.sections["moe_compute"] > 0
    assert sum(first.sections.values()) <= first.seconds, "device sections fit in the step's wall time"
    assert sum(len(o.new_token_ids) for o in outputs) == 6
