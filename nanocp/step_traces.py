"""Reads a group's step traces back from received spans (nanocp.trace_receiver): for each traced group step, which
instance paced it, why, by how much, and the requests it slowed; and whether each request's trace runs from the
router to its home worker. What `nanocp run` summarises, and what a look at Jaeger or Tempo shows by hand."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from nanocp.steps import WORK
from nanocp.trace_receiver import ReceivedSpan


@dataclass(frozen=True)
class StepTrace:
    trace_id: str
    step: int
    slowest: str  # the slowest instance, by name when its span arrived, else its rank
    cause: str
    ratio: float
    work_ms: dict[str, float]  # the slowest instance's breakdown (nanocp.steps.WORK), when its span arrived
    slowed: list[str]  # ids of the requests the group's instances ran in that step


def step_traces(spans: list[ReceivedSpan]) -> list[StepTrace]:
    """The traced group steps, in step order."""
    instances: dict[str, list[ReceivedSpan]] = defaultdict(list)
    for span in spans:
        if span.name.startswith("instance_step "):
            instances[span.trace_id].append(span)
    traces = []
    for root in (s for s in spans if s.name.startswith("group_step ")):
        rank = root.attributes["nanocp.straggler.rank"]
        members = instances[root.trace_id]
        slowest = [s for s in members if s.attributes["nanocp.rank"] == rank]
        work = {n: slowest[0].attributes[f"nanocp.step.{n}_ms"] for n in WORK} if slowest else {}
        slowed = dict.fromkeys(str(link.attributes["gen_ai.response.id"]) for s in members for link in s.links)
        traces.append(
            StepTrace(
                root.trace_id,
                int(root.attributes["nanocp.step"]),
                str(slowest[0].attributes["nanocp.instance"]) if slowest else f"rank {rank}",
                str(root.attributes["nanocp.straggler.cause"]),
                float(root.attributes["nanocp.straggler.ratio"]),
                work,
                list(slowed),
            )
        )
    return sorted(traces, key=lambda t: t.step)


def request_trees(spans: list[ReceivedSpan]) -> tuple[int, int]:
    """(requests whose router span has a home worker span as its child, requests the router traced)."""
    routers = {s.span_id: s for s in spans if s.name.startswith("text_completion ")}
    homes = {s.parent_id for s in spans if s.name.endswith("/Submit") and s.parent_id in routers}
    return len(homes), len(routers)
