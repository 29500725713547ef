"""The model-server metrics of the Gateway API Inference Extension, for the router as one pool endpoint.

An InferencePool's endpoints are the pods that serve the OpenAI API: nanocp's routers. The endpoint picker scrapes
each one's /metrics (on the HTTP port by default) for the protocol's gauges, under vLLM's names, which the picker reads
without configuration (docs/proposals/003-model-server-protocol of the project):
- TotalQueuedRequests `vllm:num_requests_waiting`: requests waiting for KV memory in the router's admission queue;
- TotalRunningRequests `vllm:num_requests_running`: requests placed and decoding;
- KVCacheUtilization `vllm:kv_cache_usage_perc`: KV pages the router granted over all its ready instances' pages,
  as a fraction (1 is full), the router's own count of what it placed, as its policy decides by;
- the optional `vllm:cache_config_info` (block_size, num_gpu_blocks), for the picker's prefix-cache scorer.
Each worker exports its own share under the same names (nanocp.worker.metrics), for dashboards.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from nanocp.placement import Placement
from nanocp.router.accounting import Ledger
from nanocp.router.admission import Admission
from nanocp.router.registry import WorkerRegistry


class PoolMetrics(Collector):
    def __init__(
        self,
        model: str,
        registry: WorkerRegistry,
        ledger: Ledger,
        admission: Admission,
        placements: Callable[[], list[Placement]],
    ) -> None:
        """`placements` gives the live requests' placements (queued ones have none yet)."""
        self._model = model
        self._registry = registry
        self._ledger = ledger
        self._admission = admission
        self._placements = placements

    def collect(self) -> Iterator[GaugeMetricFamily]:
        labels = ["model_name"]
        waiting = GaugeMetricFamily("vllm:num_requests_waiting", "requests waiting for KV memory", labels=labels)
        waiting.add_metric([self._model], self._admission.queued)
        running = GaugeMetricFamily("vllm:num_requests_running", "requests placed and decoding", labels=labels)
        running.add_metric([self._model], len(self._placements()))
        loads = [self._ledger.load(i) for i in self._registry.placeable()]
        total = sum(load.pages_total for load in loads)
        usage = GaugeMetricFamily(
            "vllm:kv_cache_usage_perc", "KV pages granted over the ready instances' pages (1 is full)", labels=labels
        )
        usage.add_metric([self._model], sum(load.pages_committed for load in loads) / total if total else 1.0)
        yield from (waiting, running, usage)
        if loads:
            config = GaugeMetricFamily(
                "vllm:cache_config_info", "KV page size and pages", labels=[*labels, "block_size", "num_gpu_blocks"]
            )
            config.add_metric([self._model, str(loads[0].page_size), str(total)], 1)
            yield config
