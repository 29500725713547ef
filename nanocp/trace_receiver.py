"""A minimal OTLP/gRPC trace receiver that keeps what exporters send it in memory.

`nanocp run` points its processes at one to summarise the traced straggler steps, and tests use it as a real
collector on loopback. For anything more, run a real collector (docs/observability.md).
"""

from __future__ import annotations

import threading
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2


@dataclass(frozen=True)
class ReceivedLink:
    trace_id: str  # hex, as W3C traceparent writes it
    span_id: str
    attributes: dict[str, Any]


@dataclass(frozen=True)
class ReceivedSpan:
    service: str  # the resource's service.name
    name: str
    trace_id: str
    span_id: str
    parent_id: str  # "" for a root
    attributes: dict[str, Any]
    events: list[str]
    links: list[ReceivedLink]


def _value(value: common_pb2.AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return tuple(_value(v) for v in value.array_value.values)
    return getattr(value, kind) if kind else None


def _attributes(pairs: Any) -> dict[str, Any]:
    return {pair.key: _value(pair.value) for pair in pairs}


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        self.lock = threading.Lock()

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        received = []
        for resource_spans in request.resource_spans:
            service = str(_attributes(resource_spans.resource.attributes).get("service.name", ""))
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    links = [
                        ReceivedLink(k.trace_id.hex(), k.span_id.hex(), _attributes(k.attributes)) for k in span.links
                    ]
                    received.append(
                        ReceivedSpan(
                            service,
                            span.name,
                            span.trace_id.hex(),
                            span.span_id.hex(),
                            span.parent_span_id.hex(),
                            _attributes(span.attributes),
                            [event.name for event in span.events],
                            links,
                        )
                    )
        with self.lock:
            self.spans.extend(received)
        return trace_service_pb2.ExportTraceServiceResponse()


class TraceReceiver:
    """Listens on loopback from `start` until `stop`; `endpoint` is what OTEL_EXPORTER_OTLP_ENDPOINT takes."""

    def __init__(self, server: grpc.Server, service: _TraceService, port: int) -> None:
        self._server = server
        self._service = service
        self.endpoint = f"http://127.0.0.1:{port}"

    @classmethod
    def start(cls) -> TraceReceiver:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        service = _TraceService()
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(service, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        return cls(server, service, port)

    def spans(self) -> list[ReceivedSpan]:
        with self._service.lock:
            return list(self._service.spans)

    def stop(self) -> None:
        self._server.stop(grace=None)
