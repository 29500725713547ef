"""Every member of a group learns, from the step exchange it already does, which instance was slowest and why; rank 0
says so in the group step span and its metrics."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from nanocp.harness.offline_group import OfflineRequest, run_group
from nanocp.model_config import PRESETS
from nanocp.worker.engine import EngineConfig
from nanocp.worker.request import SamplingParams
from nanocp.worker.timing import WORK, StepRecord, Straggler, exchange_row

CONFIG = EngineConfig(page_size=8, num_pages=128, max_step_tokens=64, max_running=8)
# Rank 1 sleeps this long in the planted section of each layer. With two members the median is their mean, so a
# verdict's margin is half the planted difference: PLANTED_S a step on the tiny model's two layers. Another process
# may deschedule either rank for 10-200 ms at any moment (CI shares its cores), and a step's verdict flips only when
# such a pause, in one step and at the wrong place, outweighs that margin: rank 0 held up in its own work, rank 1
# in its host work, or rank 1 waiting for a paused rank 0 at a route (a "routing" verdict). 0.4 s is twice the
# longest pause we allow for, and the check below needs a majority of steps, each flipped by such a pause, to fail.
PLANTED_S = 0.4
LAYERS = PRESETS["tiny"].num_layers
STEPS = 6  # tokens a request: one step each, the first with the prefill


@pytest.mark.parametrize(("section", "cause"), [("attention", "attention"), ("moe_compute", "moe")])
def test_an_instance_slowed_on_purpose_is_named_with_the_right_cause_in_verdicts_spans_and_metrics(
    section: str, cause: str
) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=STEPS, ignore_eos=True)
    requests = [[OfflineRequest(f"r{rank}-{i}", [1 + i, 2, 3], params) for i in range(2)] for rank in range(2)]
    delays: list[dict[str, float]] = [{}, {section: PLANTED_S}]
    results = run_group("tiny", CONFIG, requests, timing=True, delays=delays, metrics=True, step_spans_every=1)
    marked = [[r.straggler for r in rank.steps if r.straggler is not None] for rank in results]
    assert len(marked[0]) >= STEPS - 1, "every step but the last is judged once the next exchange arrives"
    assert marked[0] == marked[1], "both members reach the same verdict"
    # The slowest's ratio stays below 2 with two members; near 2 when the planted sleep dominates its step. A step
    # whose verdict a pause flipped (see PLANTED_S) is rightly judged otherwise, so a majority, not all, must name it.
    named = [s for s in marked[0] if s.rank == 1 and s.cause == cause and s.ratio > 1.2]
    assert 2 * len(named) > len(marked[0]), marked[0]

    # Spans: rank 0's group span of each judged step carries the verdict; both members' step spans hang beneath it.
    group_spans = spans_named(results[0].spans, "group_step tiny")
    assert not spans_named(results[1].spans, "group_step tiny"), "one member emits the group span"
    verdicts = [
        (g["attributes"]["nanocp.straggler.rank"], g["attributes"]["nanocp.straggler.cause"]) for g in group_spans
    ]
    assert verdicts == [(s.rank, s.cause) for s in marked[0]]
    for rank in (0, 1):
        children = {c["context"]["trace_id"]: c for c in spans_named(results[rank].spans, "instance_step tiny")}
        for group in group_spans:
            child = children[group["context"]["trace_id"]]
            assert child["parent_id"] == group["context"]["span_id"]
            assert child["attributes"]["nanocp.rank"] == rank
            assert child["attributes"]["nanocp.slowest"] == (group["attributes"]["nanocp.straggler.rank"] == rank)
    slowed = [c for c in spans_named(results[1].spans, "instance_step tiny") if c["attributes"]["nanocp.slowest"]]
    planted = "attention" if cause == "attention" else "moe"
    # A sleep never ends early, so this holds however busy the machine is.
    assert all(c["attributes"][f"nanocp.step.{planted}_ms"] >= LAYERS * PLANTED_S * 1e3 for c in slowed)

    # Metrics: rank 0 counts the slow rank's steps by cause, with exemplars pointing at the group steps' traces.
    (slowest,) = [
        f for f in text_string_to_metric_families(results[0].metrics) if f.name == "nanocp_group_slowest_steps"
    ]
    counts = {(s.labels["rank"], s.labels["cause"]): s for s in slowest.samples if s.name.endswith("_total")}
    assert counts[("1", cause)].value == sum(1 for s in marked[0] if (s.rank, s.cause) == (1, cause))
    exemplar = counts[("1", cause)].exemplar
    assert exemplar is not None
    assert "0x" + exemplar.labels["trace_id"] in {g["context"]["trace_id"] for g in group_spans}
    assert "nanocp_group_slowest_steps_total" not in results[1].metrics, "only rank 0 reports the group's verdicts"


def spans_named(spans: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [s for s in spans if s["name"] == name]


def test_straggler_verdict_from_work_breakdowns() -> None:
    # Columns: attention, MoE, routing, arrival lag, host. Rank 2 spends 5 ms more than the median in MoE; rank 0's
    # routing is mostly waiting for it, and rank 1 waited at the step exchange for rank 2 to finish its last step.
    work = [[1000, 500, 6000, 0, 300], [1100, 600, 5500, 900, 300], [1000, 5600, 400, 0, 300]]
    assert Straggler.of(work) == Straggler(2, pytest.approx(6900 / 2000), "moe")
    # Everyone is alike but routing itself takes longer than any excess: routing paced the step.
    assert Straggler.of([[1000, 500, 9000, 0, 300], [1010, 500, 9000, 0, 300]]).cause == "routing"
    assert Straggler.of([[1000, 500, 100, 0, 900], [1000, 500, 100, 0, 300]]) == Straggler(
        0, pytest.approx(2400 / 2100), "host"
    )
    # Arrival lag is waiting, not work: the member that waited longest at the exchange is not the straggler.
    assert Straggler.of([[1000, 500, 100, 5000, 300], [1000, 900, 100, 0, 300]]).rank == 1


def test_a_step_record_splits_its_time_into_the_shared_work_columns() -> None:
    sections = {"attention": 0.003, "merge": 0.001, "moe_compute": 0.002, "cp_route": 0.001, "moe_route": 0.0005}
    record = StepRecord(7, 4, 100, 2, 3, 0.0125, {**sections, "exchange": 0.004})
    assert dict(zip(WORK, record.work_us(), strict=True)) == {
        "attention": 4000,
        "moe": 2000,
        "routing": 1500,
        "arrival_lag": 4000,
        "host": 1000,
    }
    assert exchange_row(record) == [7, 4000, 2000, 1500, 4000, 1000]
    assert exchange_row(None) == [0] * 6
