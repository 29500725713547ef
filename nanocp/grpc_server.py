"""What the router and the workers share as gRPC servers: binding, grpc.health.v1, reflection, Prometheus metrics
on a port of their own, graceful stop."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any
from wsgiref.simple_server import WSGIServer

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, start_http_server

from nanocp.auth import AuthInterceptor, BearerAuth
from nanocp.grpc_decode import RefuseUndecodable
from nanocp.tls import ServerTls

log = logging.getLogger(__name__)


class GrpcServer:
    """A started grpc.aio server that reports SERVING for its services until `stop`."""

    def __init__(
        self, server: Any, health_servicer: health.aio.HealthServicer, port: int, metrics: WSGIServer | None
    ) -> None:
        self._server = server
        self._health = health_servicer
        self.port = port
        self._metrics = metrics

    @property
    def metrics_port(self) -> int | None:
        return int(self._metrics.server_address[1]) if self._metrics is not None else None

    @classmethod
    async def start(
        cls,
        host: str,
        port: int,
        services: Sequence[tuple[Callable[[Any, Any], None], Any, str]],
        metrics: tuple[CollectorRegistry, int] | None = None,
        *,
        auth: BearerAuth | None = None,
        tls: ServerTls | None = None,
    ) -> GrpcServer:
        """`services` holds (add_XServicer_to_server, servicer, full service name); port 0 picks a free port.

        `metrics`: a Prometheus registry and the port to serve its /metrics on (0 picks one), once gRPC is bound.
        `auth`: the tokens every call but a health check must present; `tls`: serve TLS (mutual with a client CA).
        """
        # The token is checked before anything else; then a request grpc cannot decode answers INVALID_ARGUMENT.
        interceptors: list[grpc.aio.ServerInterceptor] = (
            [AuthInterceptor(auth)] if auth is not None and auth.enabled else []
        )
        interceptors.append(RefuseUndecodable())
        # No SO_REUSEPORT: a second server on a taken port must fail, not silently share the port's traffic.
        server = grpc.aio.server(interceptors=interceptors, options=[("grpc.so_reuseport", 0)])
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        for add, servicer, _ in services:
            add(servicer, server)
        names = [name for _, _, name in services]
        reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            bound = server.add_secure_port(address, tls.credentials()) if tls else server.add_insecure_port(address)
        except RuntimeError as exc:  # grpc raises, rather than returning 0, when the address is taken
            raise OSError(f"cannot listen on {address}: {exc}") from exc
        await server.start()
        http = None
        if metrics is not None:
            registry, metrics_port = metrics
            http, _ = start_http_server(metrics_port, addr=host, registry=registry)
            log.info("metrics on http://%s:%d/metrics", host, http.server_address[1])
        for name in names:
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        return cls(server, health_servicer, bound, http)

    async def report_not_serving(self) -> None:
        """Health checks answer NOT_SERVING from now on (the server is shutting down); calls are still served."""
        await self._health.enter_graceful_shutdown()

    async def stop(self, grace: float | None = None) -> None:
        """Reports NOT_SERVING, then ends live calls (after `grace` seconds, at once when None)."""
        if self._metrics is not None:
            self._metrics.shutdown()
        await self._health.enter_graceful_shutdown()
        await self._server.stop(grace)

    async def wait_for_termination(self) -> None:
        await self._server.wait_for_termination()
