"""Every member of a group learns, from the step exchange it already does, which instance was slowest and why."""

from __future__ import annotations

import pytest

from nanocp.worker.engine import EngineConfig
from nanocp.worker.offline import OfflineRequest, run_group
from nanocp.worker.request import SamplingParams
from nanocp.worker.timing import Straggler

CONFIG = EngineConfig(page_size=8, num_pages=128, max_step_tokens=64, max_running=8)


@pytest.mark.parametrize(("section", "cause"), [("attention", "attention"), ("moe_compute", "moe")])
def test_an_instance_slowed_on_purpose_is_named_with_the_right_cause_on_every_member(section: str, cause: str) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    requests = [[OfflineRequest(f"r{rank}-{i}", [1 + i, 2, 3], params) for i in range(2)] for rank in range(2)]
    delays: list[dict[str, float]] = [{}, {section: 0.02}]  # rank 1 sleeps 20 ms in the section, each layer
    results = run_group("tiny", CONFIG, requests, timing=True, delays=delays)
    marked = [[r.straggler for r in rank.steps if r.straggler is not None] for rank in results]
    assert len(marked[0]) >= 8, "every step but the last is judged once the next exchange arrives"
    assert marked[0] == marked[1], "both members reach the same verdict"
    # With two members the median is their mean, so the slowest's ratio stays below 2. On shared cores a member is
    # sometimes descheduled, and that step is rightly judged a host delay: the planted cause must win most steps.
    named = [s for s in marked[0] if s.rank == 1 and s.cause == cause and s.ratio > 1.2]
    assert len(named) >= 0.8 * len(marked[0]), marked[0]


def test_straggler_verdict_from_work_breakdowns() -> None:
    # Rank 2 spends 5 ms more than the median in MoE; rank 0's routing is mostly waiting for it.
    work = [[1000, 500, 6000, 300], [1100, 600, 5500, 300], [1000, 5600, 400, 300]]
    assert Straggler.of(work) == Straggler(2, pytest.approx(6900 / 2000), "moe")
    # Everyone is alike but routing itself takes longer than any excess: routing paced the step.
    assert Straggler.of([[1000, 500, 9000, 300], [1010, 500, 9000, 300]]).cause == "routing"
    assert Straggler.of([[1000, 500, 100, 900], [1000, 500, 100, 300]]) == Straggler(
        0, pytest.approx(2400 / 2100), "host"
    )
