"""What watches an engine's steps: Prometheus step metrics and sampled step spans, each only when asked for, so an
engine that nobody watches pays nothing, and one with tracing off builds no span objects."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from opentelemetry import trace
from opentelemetry.trace import SpanContext

from nanocp.telemetry import AgreedIds, tracing_on
from nanocp.worker.engine import Engine, StepObserver
from nanocp.worker.metrics import StepMetrics
from nanocp.worker.scheduler import Chunk
from nanocp.worker.step_trace import GroupMember, StepTracer
from nanocp.worker.timing import StepRecord, Straggler

log = logging.getLogger(__name__)


class Observers:
    """Tells each observer, in order, of every step and verdict."""

    def __init__(self, observers: Sequence[StepObserver]) -> None:
        self._observers = observers

    def step(self, record: StepRecord, chunks: Sequence[Chunk]) -> None:
        for observer in self._observers:
            observer.step(record, chunks)

    def verdict(self, record: StepRecord, straggler: Straggler) -> None:
        for observer in self._observers:
            observer.verdict(record, straggler)


def watch_steps(
    engine: Engine,
    instance_id: str,
    *,
    metrics: bool,
    tracer_provider: trace.TracerProvider,
    spans_every: int,
    request_spans: Mapping[str, SpanContext],
) -> StepMetrics | None:
    """Sets `engine.observer`: step spans every `spans_every` steps (0: none) when `tracer_provider` records, and
    step metrics when `metrics`, which it returns. `request_spans`: the live home requests' spans, by request id."""
    tracer = None
    if spans_every > 0 and tracing_on(tracer_provider):
        if isinstance(tracer_provider.id_generator, AgreedIds):
            group = engine.group
            tracer = StepTracer(
                tracer_provider.get_tracer(__name__),
                tracer_provider.sampler,
                GroupMember(group.run_id, group.rank, group.size, instance_id),
                engine.model_config.name,
                spans_every,
                request_spans,
            )
        else:
            log.warning("no step spans: the tracer provider must be built with nanocp.telemetry.AgreedIds")
    step_metrics = StepMetrics(instance_id, engine.group.rank, tracer.trace_id if tracer else None) if metrics else None
    # The tracer first: the metrics read its trace ids for their exemplars.
    observers = [o for o in (tracer, step_metrics) if o is not None]
    engine.observer = Observers(observers) if observers else None
    return step_metrics
