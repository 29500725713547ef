"""Prometheus metrics of the router.

Load is read at scrape time from the counts the router keeps anyway (no second bookkeeping): per instance KV pages
committed and total, home batch, routed rows, readiness; live requests per CP degree; the admission queue. Latency
is observed as it happens, with the OpenTelemetry GenAI names and bucket boundaries: time to first token and time
per output token, each with the request's trace id as an exemplar when its span is sampled (shown in the OpenMetrics
exposition); and the CP degree each request ended with. Requests moved to another group after theirs failed are
counted by why it failed. Served over HTTP on the router's --metrics-port.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from typing import get_args

from opentelemetry import trace
from prometheus_client import Counter as CounterMetric
from prometheus_client import Histogram
from prometheus_client.core import CollectorRegistry, CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from nanocp.placement import Placement
from nanocp.router.accounting import Ledger
from nanocp.router.admission import Admission
from nanocp.router.registry import LossReason, WorkerRegistry


class RouterCollector(Collector):
    def __init__(
        self,
        registry: WorkerRegistry,
        ledger: Ledger,
        admission: Admission,
        placements: Callable[[], list[Placement]],
    ) -> None:
        """`placements` gives the live requests' placements."""
        self._registry = registry
        self._ledger = ledger
        self._admission = admission
        self._placements = placements

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        labels = ["instance", "group"]
        committed = GaugeMetricFamily(
            "nanocp_instance_kv_pages_committed", "KV pages the router granted on the instance", labels=labels
        )
        total = GaugeMetricFamily("nanocp_instance_kv_pages_total", "KV pages of the instance", labels=labels)
        batch = GaugeMetricFamily("nanocp_instance_home_batch", "requests whose home is the instance", labels=labels)
        rows = GaugeMetricFamily(
            "nanocp_instance_routed_rows", "query rows of CP requests it routes each decode step", labels=labels
        )
        ready = GaugeMetricFamily("nanocp_instance_ready", "1 when the instance takes requests", labels=labels)
        for instance in self._registry.instances():
            if instance.info is None:
                continue
            load = self._ledger.load(instance)
            values = [instance.id, instance.info.group]
            committed.add_metric(values, load.pages_committed)
            total.add_metric(values, load.pages_total)
            batch.add_metric(values, load.home_batch)
            rows.add_metric(values, load.routed_rows)
            ready.add_metric(values, 0.0 if self._registry.problem(instance) else 1.0)
        yield from (committed, total, batch, rows, ready)
        live = GaugeMetricFamily("nanocp_requests_live", "live requests by CP degree", labels=["cp_degree"])
        for degree, count in sorted(Counter(p.cp_degree for p in self._placements()).items()):
            live.add_metric([str(degree)], count)
        yield live
        yield GaugeMetricFamily(
            "nanocp_admission_queue_length", "requests waiting for KV memory", value=self._admission.queued
        )
        yield CounterMetricFamily(
            "nanocp_admission_waited", "requests that waited for KV memory", value=self._admission.waited_total
        )


# Bucket boundaries the OpenTelemetry GenAI semantic conventions advise, in seconds.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
DEGREE_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 32)


class LatencyMetrics:
    """Time to first token (from the router receiving the request) and time per output token, per model; and the
    distribution of CP degrees."""

    def __init__(self, model: str) -> None:
        self.registry = CollectorRegistry()
        labels = ["gen_ai_request_model"]
        self._ttft = Histogram(
            "gen_ai_server_time_to_first_token",
            "time to generate the first token, from the request's arrival",
            labels,
            unit="seconds",
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        ).labels(model)
        self._tpot = Histogram(
            "gen_ai_server_time_per_output_token",
            "time per output token after the first",
            labels,
            unit="seconds",
            buckets=TPOT_BUCKETS,
            registry=self.registry,
        ).labels(model)
        self._degree = Histogram(
            "nanocp_request_cp_degree",
            "the CP degree each placed request ended with (instances holding its KV)",
            buckets=DEGREE_BUCKETS,
            registry=self.registry,
        )

    def first_token(self, seconds: float, span: trace.Span) -> None:
        self._ttft.observe(seconds, _exemplar(span))

    def finished(self, seconds_after_first: float, tokens: int, span: trace.Span) -> None:
        if tokens > 1:
            self._tpot.observe(seconds_after_first / (tokens - 1), _exemplar(span))

    def placed(self, cp_degree: int) -> None:
        self._degree.observe(cp_degree)


class MigrationMetrics:
    """nanocp_request_migrations_total{reason}: requests moved to another group, by why their group was lost."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._moves = CounterMetric(
            "nanocp_request_migrations",
            "requests placed again on another decode group after theirs failed, by why it was lost",
            ["reason"],
            registry=registry,
        )
        for reason in get_args(LossReason):  # every reason shows, at 0 until it happens
            self._moves.labels(reason)

    def migrated(self, reason: LossReason) -> None:
        self._moves.labels(reason).inc()


def _exemplar(span: trace.Span) -> dict[str, str] | None:
    """The span's trace id when it is sampled: where the trace of this observation can be found."""
    context = span.get_span_context()
    return {"trace_id": format(context.trace_id, "032x")} if context.trace_flags.sampled else None
