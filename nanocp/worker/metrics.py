"""Prometheus metrics of a worker: its steps as they happen, its load at scrape time.

Step time is this instance's; the straggler ratio and the slowest-step counts describe the whole group, so only
rank 0 of a group observes them (every member holds the same verdicts). Served on the worker's --metrics-port.
When the step was traced, its observations carry the step trace's id as an exemplar (shown in the OpenMetrics
exposition, which Prometheus asks for when exemplar storage is on), so a slow bucket leads to the trace that explains
it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from prometheus_client import Counter, Histogram
from prometheus_client.core import CollectorRegistry, GaugeMetricFamily
from prometheus_client.registry import Collector

from nanocp.worker.request import EngineLoad
from nanocp.worker.scheduler import Chunk
from nanocp.worker.timing import StepRecord, Straggler

STEP_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)
RATIO_BUCKETS = (1.0, 1.05, 1.1, 1.2, 1.3, 1.5, 1.75, 2.0, 2.5, 3.0, 5.0, 10.0)


class StepMetrics:
    """What the engine reports after each step and each group verdict."""

    def __init__(self, instance: str, rank: int, trace_id: Callable[[int], str | None] | None = None) -> None:
        """`trace_id`: a step's trace id if it was traced (StepTracer.trace_id), for exemplars."""
        self.registry = CollectorRegistry()
        self._rank = rank
        self._trace_id = trace_id
        self._step = Histogram(
            "nanocp_step",
            "this instance's decode step time",
            unit="seconds",
            buckets=STEP_BUCKETS,
            registry=self.registry,
        )
        self._ratio = Histogram(
            "nanocp_group_straggler_ratio",
            "the group's slowest instance over the median, per step (reported by rank 0)",
            buckets=RATIO_BUCKETS,
            registry=self.registry,
        )
        self._slowest = Counter(
            "nanocp_group_slowest_steps",
            "steps in which a rank of the group was the slowest, by cause (reported by rank 0)",
            ["rank", "cause"],
            registry=self.registry,
        )

    def step(self, record: StepRecord, chunks: Sequence[Chunk]) -> None:
        self._step.observe(record.seconds, self._exemplar(record.step))

    def verdict(self, record: StepRecord, straggler: Straggler) -> None:
        if self._rank == 0:
            exemplar = self._exemplar(record.step)
            self._ratio.observe(straggler.ratio, exemplar)
            self._slowest.labels(str(straggler.rank), straggler.cause).inc(1, exemplar)

    def _exemplar(self, step: int) -> dict[str, str] | None:
        trace_id = self._trace_id(step) if self._trace_id is not None else None
        return {"trace_id": trace_id} if trace_id is not None else None


class LoadCollector(Collector):
    def __init__(self, load: Callable[[], EngineLoad]) -> None:
        self._load = load

    def collect(self) -> Iterator[GaugeMetricFamily]:
        load = self._load()
        yield GaugeMetricFamily("nanocp_kv_pages_in_use", "KV pages holding tokens here", value=load.pages_in_use)
        yield GaugeMetricFamily("nanocp_kv_pages_total", "KV pages of this instance", value=load.pages_total)
        yield GaugeMetricFamily("nanocp_requests_running", "home requests in the running batch", value=load.running)
        yield GaugeMetricFamily("nanocp_requests_waiting", "home requests waiting to run", value=load.waiting)
        # The same load under the names of the Gateway API Inference Extension's model-server protocol (vLLM's).
        yield GaugeMetricFamily("vllm:num_requests_waiting", "home requests waiting to run", value=load.waiting)
        yield GaugeMetricFamily("vllm:num_requests_running", "home requests running", value=load.running)
        usage = load.pages_in_use / load.pages_total if load.pages_total else 0.0
        yield GaugeMetricFamily("vllm:kv_cache_usage_perc", "KV pages in use over all (1 is full)", value=usage)
