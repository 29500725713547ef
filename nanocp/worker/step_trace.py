"""Sampled step spans: each instance's breakdown of a step, and one group span naming the straggler and its cause.

Every member samples the same steps: every `every`-th, when the tracer provider's sampler keeps that step's trace id
(which every member derives alike from the group's run id and the step number, telemetry.step_ids). So a sampled
group step is one trace: rank 0's `group_step {model}` span at its root, naming the slowest rank, the cause and the
ratio over the median, and every member's `instance_step {model}` span beneath it with its own breakdown. The root's
ids are agreed, so members parent their spans to it without talking. Spans are emitted once the group's verdict is
known, at the next step's exchange. Each instance span links to the request spans (the home worker's Submit spans)
of its requests in that step: the requests the straggler slowed, wherever their home is.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace.sampling import Sampler
from opentelemetry.trace import Link, NonRecordingSpan, SpanContext, TraceFlags
from opentelemetry.util.types import AttributeValue

from nanocp.telemetry import agreed_ids, step_ids
from nanocp.worker.scheduler import Chunk
from nanocp.worker.timing import WORK, StepRecord, Straggler

_KEPT = 8  # sampled steps awaiting their verdict, or recent ones for exemplars; older ones are dropped


@dataclass(frozen=True)
class GroupMember:
    run_id: str  # Group.run_id: the same on every member of this run of the group
    rank: int
    size: int
    instance: str


@dataclass(frozen=True)
class _Sampled:
    end_ns: int
    links: list[Link]


class StepTracer:
    """A StepObserver: emits the spans of sampled steps. Built only when tracing is on."""

    def __init__(
        self,
        tracer: trace.Tracer,
        sampler: Sampler,
        member: GroupMember,
        model: str,
        every: int,
        request_spans: Mapping[str, SpanContext],
    ) -> None:
        """`sampler`: the provider's, so members decide alike; `request_spans`: the span of each live home request,
        by request id, which the worker's server keeps."""
        if every < 1:
            raise ValueError(f"step spans every {every} steps: give 1 or more")
        self._tracer = tracer
        self._sampler = sampler
        self._member = member
        self._model = model
        self._every = every
        self._request_spans = request_spans
        self._awaiting: dict[int, _Sampled] = {}  # by step
        self._traced: dict[int, str] = {}  # recent sampled steps' trace ids (hex), by step

    def trace_id(self, step: int) -> str | None:
        """The trace id (hex) of a recent step's trace if that step is sampled, for metric exemplars."""
        return self._traced.get(step)

    def step(self, record: StepRecord, chunks: Sequence[Chunk]) -> None:
        if record.step % self._every:
            return
        trace_id, _ = step_ids(self._member.run_id, record.step)
        name = f"group_step {self._model}"
        if not self._sampler.should_sample(Context(), trace_id, name).decision.is_sampled():
            return
        _keep(self._traced, record.step, format(trace_id, "032x"))
        ids = dict.fromkeys(c.request.request_id for c in chunks)  # a request's chunks, once, in step order
        links = [Link(span, {"gen_ai.response.id": i}) for i in ids if (span := self._request_spans.get(i))]
        sampled = _Sampled(time.time_ns(), links)
        if self._member.size == 1:  # no verdict will come
            self._emit(record, None, sampled)
        else:
            _keep(self._awaiting, record.step, sampled)

    def verdict(self, record: StepRecord, straggler: Straggler) -> None:
        sampled = self._awaiting.pop(record.step, None)
        if sampled is not None:
            self._emit(record, straggler, sampled)

    def _emit(self, record: StepRecord, straggler: Straggler | None, sampled: _Sampled) -> None:
        member = self._member
        trace_id, root_id = step_ids(member.run_id, record.step)
        start_ns = sampled.end_ns - round(record.seconds * 1e9)
        common: dict[str, AttributeValue] = {"gen_ai.request.model": self._model, "nanocp.step": record.step}
        instance: dict[str, AttributeValue] = {
            **common,
            "nanocp.instance": member.instance,
            "nanocp.rank": member.rank,
            **{f"nanocp.step.{name}_ms": us / 1e3 for name, us in zip(WORK, record.work_us(), strict=True)},
            "nanocp.step.home_tokens": record.home_tokens,
            "nanocp.step.kv_tokens_read": record.kv_tokens_read,
            "nanocp.step.rows_routed": record.rows_routed,
            "nanocp.kv.pages_in_use": record.pages_in_use,
        }
        times = (start_ns, sampled.end_ns)
        if straggler is None:  # a lone instance: its step span is the trace's root
            with agreed_ids(trace_id, root_id):
                self._span("instance_step", Context(), instance, sampled.links, times)
            return
        if member.rank == 0:
            group: dict[str, AttributeValue] = {
                **common,
                "nanocp.group.size": member.size,
                "nanocp.straggler.rank": straggler.rank,
                "nanocp.straggler.cause": straggler.cause,
                "nanocp.straggler.ratio": straggler.ratio,
            }
            with agreed_ids(trace_id, root_id):
                self._span("group_step", Context(), group, [], times)
        instance["nanocp.slowest"] = straggler.rank == member.rank
        root = SpanContext(trace_id, root_id, is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED))
        self._span("instance_step", trace.set_span_in_context(NonRecordingSpan(root)), instance, sampled.links, times)

    def _span(
        self,
        operation: str,
        parent: Context,
        attributes: dict[str, AttributeValue],
        links: list[Link],
        times: tuple[int, int],
    ) -> None:
        span = self._tracer.start_span(
            f"{operation} {self._model}", parent, attributes=attributes, links=links, start_time=times[0]
        )
        span.end(times[1])


_T = TypeVar("_T")


def _keep(recent: dict[int, _T], step: int, value: _T) -> None:
    recent[step] = value
    while len(recent) > _KEPT:
        del recent[next(iter(recent))]
