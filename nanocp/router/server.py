"""Wires the router together and serves it: registry, ledger, policy, admission queue, the gRPC API and the
OpenAI-compatible HTTP API."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import grpc
from fastapi import FastAPI
from opentelemetry import trace
from prometheus_client import CollectorRegistry

from nanocp.auth import BearerAuth, TokenFile, bearer_token
from nanocp.drain import wait_idle
from nanocp.grpc_server import GrpcServer
from nanocp.model_config import load_model_config
from nanocp.router import DEFAULT_MAX_MIGRATIONS
from nanocp.router.accounting import Ledger
from nanocp.router.admission import Admission
from nanocp.router.http.app import create_app
from nanocp.router.http.pool_metrics import PoolMetrics
from nanocp.router.http.server import HttpServer
from nanocp.router.metrics import RouterCollector
from nanocp.router.placement import PlacementPolicy
from nanocp.router.policies import make_policy
from nanocp.router.registry import Discovery, Instance, StaticDiscovery, WorkerRegistry
from nanocp.router.service import SERVICE_NAME, RouterServicer
from nanocp.tls import ChannelTls, ServerTls, aio_channel
from nanocp.tokenizer import load_tokenizer
from nanocp.v1 import router_pb2_grpc

log = logging.getLogger(__name__)


class RouterServer:
    def __init__(
        self,
        server: GrpcServer,
        registry: WorkerRegistry,
        servicer: RouterServicer,
        discovery: asyncio.Task[None] | None = None,
        http: HttpServer | None = None,
    ) -> None:
        self._server = server
        self._http = http
        self._servicer = servicer
        self._registry = registry
        self._discovery = discovery

    @property
    def metrics_port(self) -> int | None:
        return self._server.metrics_port

    @property
    def port(self) -> int:
        return self._server.port

    @property
    def http_port(self) -> int | None:
        return self._http.port if self._http is not None else None

    @property
    def http_app(self) -> FastAPI | None:
        """The HTTP API as an ASGI app (to mount it elsewhere, or to drive it without a socket)."""
        return self._http.app if self._http is not None else None

    async def stop(self, grace: float | None = None) -> None:
        if self._http is not None:
            await self._http.stop(grace)
        await self._server.stop(grace)
        await _cancel(self._discovery)
        await self._registry.stop()

    async def shut_down(self, grace: float) -> None:
        """What SIGTERM does: health NOT_SERVING, a new Generate ends UNAVAILABLE (clients retry elsewhere), the live
        streams get `grace` seconds to finish (Abort and ListInstances still answer), then the router stops."""
        self._servicer.draining = True
        await self._server.report_not_serving()
        await wait_idle(lambda: self._servicer.live_requests == 0, lambda: False, grace, settle_s=0.0)
        await self.stop()

    async def wait_for_termination(self) -> None:
        await self._server.wait_for_termination()


async def serve_router(
    model: str,
    workers: list[str],
    host: str,
    port: int,
    policy: PlacementPolicy | None = None,
    queue_size: int = 256,
    *,
    reserve_output_tokens: int | None = None,
    metrics_port: int | None = None,
    http_port: int | None = None,
    heartbeat_s: float = 1.0,
    max_migrations: int = DEFAULT_MAX_MIGRATIONS,
    tracer_provider: trace.TracerProvider | None = None,
    discovery: Discovery | None = None,
    auth: BearerAuth | None = None,
    tls: ServerTls | None = None,
    internal_token: TokenFile | str | None = None,
    worker_tls: ChannelTls | None = None,
) -> RouterServer:
    """Serves the router for `model` (a preset or a model directory; only its config and tokenizer are read).

    `workers` are host:port addresses; each is asked what it serves before the router starts taking requests.
    A `discovery` (e.g. Kubernetes) instead keeps adding and removing workers for as long as the router serves.
    `queue_size` bounds the requests that wait for KV memory; port 0 picks a free port. `http_port` serves the
    OpenAI-compatible HTTP API (nanocp.router.http) on the same host; None: gRPC only. A request whose group fails
    moves to a healthy group at most `max_migrations` times (nanocp.router.migration). `auth` and `tls` guard the
    public API; the router presents `internal_token` and `worker_tls` to workers.
    """
    model_config = load_model_config(model)
    placement_policy = policy or make_policy("static")
    ledger = Ledger()
    registry = WorkerRegistry(model_config, heartbeat_s, _dialer(internal_token, worker_tls))
    admission = Admission(placement_policy, registry, ledger, queue_size)

    tokenizer = load_tokenizer(model_config)
    servicer = RouterServicer(
        model_config,
        tokenizer,
        registry,
        ledger,
        admission,
        trace.get_tracer(__name__, tracer_provider=tracer_provider),
        reserve_output_tokens,
        max_migrations,
        auth,
    )
    _follow_instances(registry, ledger, admission, servicer)
    discovering = None
    if discovery is None:
        await StaticDiscovery(workers).run(registry)
    else:
        discovering = asyncio.create_task(discovery.run(registry), name="discovery")
    metrics = _register_metrics(model_config.name, registry, ledger, admission, servicer, metrics_port)
    server = http = None
    try:
        server = await GrpcServer.start(
            host,
            port,
            [(router_pb2_grpc.add_RouterServiceServicer_to_server, servicer, SERVICE_NAME)],
            metrics,
            auth=auth,
            tls=tls,
        )
        if http_port is not None:
            app = create_app(servicer, registry, model_config, tokenizer, servicer.latency.registry)
            http = await HttpServer.start(app, host, http_port)
    except BaseException:
        if server is not None:
            await server.stop()
        await _cancel(discovering)
        await registry.stop()
        raise
    ready = sum(i.ready for i in registry.instances())
    log.info("router serves %s on %s:%d, policy %s", model_config.name, host, server.port, placement_policy.name)
    log.info("%d of %d workers ready", ready, len(registry.instances()))
    return RouterServer(server, registry, servicer, discovering, http)


def _follow_instances(registry: WorkerRegistry, ledger: Ledger, admission: Admission, servicer: RouterServicer) -> None:
    """What the router does when an instance answers or is lost."""

    def on_load(instance: Instance) -> None:
        ledger.reconcile(instance)
        servicer.migrator.release_recovered()  # a failed group's placements, once their instances answer again
        admission.pump()  # an instance that came back may take waiting requests

    registry.on_load = on_load
    registry.on_lost = servicer.lose_group


def _register_metrics(
    model: str,
    registry: WorkerRegistry,
    ledger: Ledger,
    admission: Admission,
    servicer: RouterServicer,
    metrics_port: int | None,
) -> tuple[CollectorRegistry, int] | None:
    """The Inference Extension's model-server gauges (on the HTTP port's /metrics, and on the metrics port), and
    with a metrics port the router's own collector: what GrpcServer serves there."""
    servicer.latency.registry.register(PoolMetrics(model, registry, ledger, admission, servicer.placements))
    if metrics_port is None:
        return None
    servicer.latency.registry.register(RouterCollector(registry, ledger, admission, servicer.placements))
    return servicer.latency.registry, metrics_port


def _dialer(internal_token: TokenFile | str | None, tls: ChannelTls | None) -> Callable[[str], grpc.aio.Channel]:
    """How the router connects to a worker: over TLS and with the internal token, when given (nanocp.auth)."""
    interceptors = bearer_token(internal_token) if internal_token is not None else None
    return lambda address: aio_channel(address, tls, interceptors)


async def _cancel(task: asyncio.Task[None] | None) -> None:
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
