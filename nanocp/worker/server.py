"""The worker's gRPC face (nanocp.internal.v1.WorkerService) over an EngineLoop.

A Submit stream lives exactly as long as its request: outputs cross from the engine thread to the event loop through
a queue, and a stream that ends early (cancelled, deadline passed, connection lost) aborts its request, so its KV
pages go back to the pool at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import grpc
from opentelemetry import trace

from nanocp.auth import BearerAuth
from nanocp.drain import wait_idle
from nanocp.grpc_server import GrpcServer
from nanocp.internal.v1 import worker_pb2, worker_pb2_grpc
from nanocp.placement import Shard
from nanocp.telemetry import STEP_SPANS_EVERY, extract_context
from nanocp.tls import ServerTls
from nanocp.v1 import common_pb2
from nanocp.worker.engine import Engine, EngineConfig
from nanocp.worker.group import Group
from nanocp.worker.group_spec import GroupSpec
from nanocp.worker.loop import EngineLoop
from nanocp.worker.metrics import LoadCollector
from nanocp.worker.observe import watch_steps
from nanocp.worker.request import EngineError, FinishReason, RequestOutput, SamplingParams

log = logging.getLogger(__name__)

SERVICE_NAME = worker_pb2.DESCRIPTOR.services_by_name["WorkerService"].full_name

_STATUS = {
    "INTERNAL": grpc.StatusCode.INTERNAL,
    "INVALID_ARGUMENT": grpc.StatusCode.INVALID_ARGUMENT,
    "RESOURCE_EXHAUSTED": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "ALREADY_EXISTS": grpc.StatusCode.ALREADY_EXISTS,
    "NOT_FOUND": grpc.StatusCode.NOT_FOUND,
    "UNAVAILABLE": grpc.StatusCode.UNAVAILABLE,
}
_FINISH = {
    FinishReason.STOP: common_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: common_pb2.FINISH_REASON_LENGTH,
    FinishReason.ABORT: common_pb2.FINISH_REASON_ABORT,
}


def sampling_params(proto: common_pb2.SamplingParams) -> SamplingParams:
    """The engine's settings from the wire; unset fields keep the engine's defaults."""
    defaults = SamplingParams()
    return SamplingParams(
        temperature=proto.temperature if proto.HasField("temperature") else defaults.temperature,
        top_k=proto.top_k if proto.HasField("top_k") else defaults.top_k,
        top_p=proto.top_p if proto.HasField("top_p") else defaults.top_p,
        seed=proto.seed if proto.HasField("seed") else None,
        max_tokens=proto.max_tokens if proto.HasField("max_tokens") else defaults.max_tokens,
        stop_token_ids=tuple(proto.stop_token_ids),
        ignore_eos=proto.ignore_eos,
    )


async def _abort(context: Any, span: trace.Span, code: grpc.StatusCode, message: str) -> None:
    span.set_status(trace.StatusCode.ERROR, message)
    span.set_attribute("error.type", code.name)
    await context.abort(code, message)


class WorkerServicer(worker_pb2_grpc.WorkerServiceServicer):
    def __init__(
        self,
        engine_loop: EngineLoop,
        instance_id: str,
        tracer: trace.Tracer,
        domain: str = "",
        request_spans: dict[str, trace.SpanContext] | None = None,
    ) -> None:
        """`request_spans`: where the recorded Submit spans of live requests are kept by request id, for the step
        spans to link to."""
        self._domain = domain
        self._engine_loop = engine_loop
        self._engine = engine_loop.engine
        self._instance_id = instance_id
        self._tracer = tracer
        self._request_spans = request_spans if request_spans is not None else {}
        self.draining = False  # shutting down: no new request
        self.streams = 0  # Submit calls not yet ended

    async def Submit(self, request: worker_pb2.SubmitRequest, context: Any) -> AsyncIterator[worker_pb2.SubmitResponse]:
        shards = [s.instance for s in request.placement.shards] or [self._instance_id]
        # The span is ended by hand, never made current: grpc may close this generator from another context.
        span = self._tracer.start_span(
            f"{SERVICE_NAME}/Submit",
            context=extract_context(context.invocation_metadata()),
            kind=trace.SpanKind.SERVER,
            attributes={
                "rpc.system": "grpc",
                "gen_ai.request.model": self._engine.model_config.name,
                "gen_ai.response.id": request.request_id,
                "gen_ai.usage.input_tokens": len(request.prompt_token_ids),
                "nanocp.instance": self._instance_id,
                "nanocp.home": self._instance_id,
                "nanocp.cp_degree": len(shards),
                "nanocp.shards": shards,
            },
        )
        if span.is_recording():
            self._request_spans[request.request_id] = span.get_span_context()
        self.streams += 1
        try:
            if self.draining:
                await _abort(
                    context, span, grpc.StatusCode.UNAVAILABLE, f"instance {self._instance_id} is shutting down"
                )
            async with contextlib.aclosing(self._submit(request, context, span)) as responses:
                async for response in responses:
                    yield response  # if grpc closes us here, aclosing aborts the request at once
        finally:
            self.streams -= 1
            self._request_spans.pop(request.request_id, None)
            span.end()

    async def _submit(
        self, request: worker_pb2.SubmitRequest, context: Any, span: trace.Span
    ) -> AsyncGenerator[worker_pb2.SubmitResponse]:
        outputs: asyncio.Queue[RequestOutput] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def on_output(output: RequestOutput) -> None:  # runs on the engine thread
            with contextlib.suppress(RuntimeError):  # the event loop is closed: nobody listens any more
                loop.call_soon_threadsafe(outputs.put_nowait, output)

        # Called on the event loop, not in a thread: a submit still running in a thread when the call is cancelled
        # could land after the abort below and leave the request running for nobody.
        try:
            self._engine_loop.submit(
                request.request_id,
                list(request.prompt_token_ids),
                dataclasses.replace(sampling_params(request.sampling), token_offset=request.tokens_generated),
                on_output,
                [Shard(s.rank, s.start, s.page_quota) for s in request.placement.shards] or None,
            )
        except EngineError as exc:
            await _abort(context, span, _STATUS[exc.code], str(exc))
        finished = False
        try:
            while not finished:
                output = await outputs.get()
                finished = output.finish_reason is not None
                if output.completion_tokens == len(output.new_token_ids) > 0:
                    span.add_event("first_token")
                if output.error is not None:
                    code = _STATUS.get(output.error_code, grpc.StatusCode.INTERNAL)
                    await _abort(context, span, code, f"instance {self._instance_id}: {output.error}")
                response = worker_pb2.SubmitResponse(token_ids=output.new_token_ids, needs_pages=output.needs_pages)
                if output.finish_reason is not None:
                    response.finish_reason = _FINISH[output.finish_reason]
                    response.usage.prompt_tokens = output.prompt_tokens
                    response.usage.completion_tokens = output.completion_tokens
                    span.set_attributes(
                        {
                            "gen_ai.usage.input_tokens": output.prompt_tokens,
                            "gen_ai.usage.output_tokens": output.completion_tokens,
                            "gen_ai.response.finish_reasons": [output.finish_reason.value],
                        }
                    )
                yield response
        finally:
            if not finished:  # the caller went away mid-stream: free the pages now, not at max_tokens
                span.set_status(trace.StatusCode.ERROR, "the caller cancelled the stream")
                self._engine_loop.abort(request.request_id)

    async def _refuse(self, context: Any, exc: EngineError) -> None:
        await context.abort(_STATUS[exc.code], f"instance {self._instance_id}: {exc}")

    async def Extend(self, request: worker_pb2.ExtendRequest, context: Any) -> worker_pb2.ExtendResponse:
        shards = [Shard(s.rank, s.start, s.page_quota) for s in request.placement.shards] or None
        try:  # what no request could grow into; whether it is this request's growth, its engine checks
            self._engine.admission.check_id(request.request_id)
            if shards is not None:
                self._engine.admission.check_grown(shards)
        except EngineError as exc:
            await self._refuse(context, exc)
        if not self._engine_loop.extend(request.request_id, shards):
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"instance {self._instance_id} has no request {request.request_id!r}"
            )
        return worker_pb2.ExtendResponse()

    async def GetSteps(self, request: worker_pb2.GetStepsRequest, context: Any) -> worker_pb2.GetStepsResponse:
        if request.after_step < 0 or request.limit < 0:
            message = f"after_step ({request.after_step}) and limit ({request.limit}) must be >= 0"
            await self._refuse(context, EngineError("INVALID_ARGUMENT", message))
        return worker_pb2.GetStepsResponse(
            steps=[
                worker_pb2.StepRecord(
                    step=r.step,
                    home_tokens=r.home_tokens,
                    kv_tokens_read=r.kv_tokens_read,
                    rows_routed=r.rows_routed,
                    kv_pages_in_use=r.pages_in_use,
                    step_ms=1000 * r.seconds,
                    section_ms={name: 1000 * s for name, s in r.sections.items()},
                    slowest_rank=r.straggler.rank if r.straggler else -1,
                    straggler_ratio=r.straggler.ratio if r.straggler else 0.0,
                    straggler_cause=r.straggler.cause if r.straggler else "",
                )
                for r in self._engine.steps.after(request.after_step, request.limit)
            ]
        )

    async def _refuse_if_failed(self, context: Any) -> None:
        if self._engine_loop.failed is not None:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"instance {self._instance_id}: its engine failed ({self._engine_loop.failed}); it must restart",
            )

    async def Abort(self, request: worker_pb2.AbortRequest, context: Any) -> worker_pb2.AbortResponse:
        try:
            self._engine.admission.check_id(request.request_id)
        except EngineError as exc:
            await self._refuse(context, exc)
        if not self._engine_loop.abort(request.request_id):
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"instance {self._instance_id} has no request {request.request_id!r}"
            )
        return worker_pb2.AbortResponse()

    async def GetInfo(self, request: worker_pb2.GetInfoRequest, context: Any) -> worker_pb2.GetInfoResponse:
        await self._refuse_if_failed(context)
        model, config, group = self._engine.model_config, self._engine.config, self._engine.group
        return worker_pb2.GetInfoResponse(
            instance_id=self._instance_id,
            model=model.name,
            vocab_size=model.vocab_size,
            max_context=model.max_context,
            page_size=config.page_size,
            kv_pages_total=config.num_pages,
            group=group.spec.name,
            rank=group.rank,
            group_size=group.size,
            domain=self._domain,
            collective_timeout_s=group.timeout_s,
        )

    async def GetLoad(self, request: worker_pb2.GetLoadRequest, context: Any) -> worker_pb2.GetLoadResponse:
        await self._refuse_if_failed(context)
        load = self._engine_loop.load()
        return worker_pb2.GetLoadResponse(
            running=load.running,
            waiting=load.waiting,
            kv_pages_total=load.pages_total,
            kv_pages_in_use=load.pages_in_use,
            draining=self.draining,
        )


class WorkerServer:
    """A running worker: the engine thread and the gRPC server in front of it."""

    def __init__(self, server: GrpcServer, engine_loop: EngineLoop, servicer: WorkerServicer, instance_id: str) -> None:
        self._server = server
        self._engine_loop = engine_loop
        self._servicer = servicer
        self.instance_id = instance_id
        self.drained = False  # a shutdown saw this instance and its whole group idle

    @property
    def metrics_port(self) -> int | None:
        return self._server.metrics_port

    @property
    def engine(self) -> Engine:
        """For in-process callers (tests, benchmarks) to read; only the engine thread may change it."""
        return self._engine_loop.engine

    @property
    def port(self) -> int:
        return self._server.port

    @property
    def failure(self) -> Exception | None:
        """Why the engine (or its decode group) failed, once it has: the process must then exit so it restarts."""
        return self._engine_loop.failed

    async def stop(self, grace: float | None = None) -> None:
        # The server first: cancelling live streams aborts their requests, then the engine thread can end.
        await self._server.stop(grace)
        self._engine_loop.stop()

    async def shut_down(self, grace: float, settle_s: float = 0.5) -> None:
        """What SIGTERM does: takes no new request (health NOT_SERVING, Submit UNAVAILABLE, load reports say
        draining so the router places nothing on the group), waits up to `grace` seconds for the live requests to
        finish, its own and those of its group (a member that left would fail its peers' streams), then stops."""
        self._servicer.draining = True
        await self._server.report_not_serving()
        self.drained = await wait_idle(self._idle, lambda: self.failure is not None, grace, settle_s)
        await self.stop()

    def _idle(self) -> bool:
        load = self._engine_loop.load()
        busy = self._servicer.streams or load.running or load.waiting or load.pages_in_use
        return not busy and self._engine_loop.group_idle

    async def wait_for_termination(self) -> None:
        await self._server.wait_for_termination()


async def serve_worker(
    model: str,
    engine_config: EngineConfig,
    host: str,
    port: int,
    instance_id: str,
    *,
    group: GroupSpec | None = None,
    collective_timeout_s: float = 60.0,
    domain: str = "",
    metrics_port: int | None = None,
    tracer_provider: trace.TracerProvider | None = None,
    step_spans_every: int = STEP_SPANS_EVERY,
    auth: BearerAuth | None = None,
    tls: ServerTls | None = None,
) -> WorkerServer:
    """Joins the decode group (alone by default), builds the engine for `model` (a preset or a model directory)
    with this rank's experts, and serves it; port 0 picks a port.

    A peer that dies or stalls past `collective_timeout_s` fails the group: live requests end UNAVAILABLE, the
    worker stops serving and `WorkerServer.failure` says why. Spans go to `tracer_provider`, or to the global one
    that nanocp.telemetry.configure_tracing installs; with tracing on, every `step_spans_every`-th step (0: none)
    is traced too (nanocp.worker.step_trace). `auth`: the internal token a caller must present; `tls`: serve TLS,
    mutual with a client CA (nanocp.auth, nanocp.tls).
    """
    spec = group or GroupSpec()

    def build() -> Engine:  # rendezvous blocks until every rank has joined
        return Engine.from_spec(model, engine_config, Group(spec, engine_config.device, collective_timeout_s))

    engine = await asyncio.to_thread(build)
    engine.timer.enabled = True  # host clocks (CUDA events on GPU) around sections, for GetSteps and verdicts
    provider = tracer_provider or trace.get_tracer_provider()
    request_spans: dict[str, trace.SpanContext] = {}
    metrics = watch_steps(
        engine,
        instance_id,
        metrics=metrics_port is not None,
        tracer_provider=provider,
        spans_every=step_spans_every,
        request_spans=request_spans,
    )
    loop = asyncio.get_running_loop()
    stopping: list[asyncio.Task[None]] = []

    def on_fatal(exc: Exception) -> None:  # on the engine thread
        log.error("worker %s (decode group %s) failed: %s; stopping", instance_id, spec.name, exc)
        loop.call_soon_threadsafe(lambda: stopping.append(loop.create_task(worker.stop(grace=1.0))))

    engine_loop = EngineLoop(engine, on_fatal)
    servicer = WorkerServicer(engine_loop, instance_id, provider.get_tracer(__name__), domain, request_spans)
    served = None
    if metrics is not None and metrics_port is not None:
        metrics.registry.register(LoadCollector(engine_loop.load))
        served = (metrics.registry, metrics_port)
    try:
        server = await GrpcServer.start(
            host,
            port,
            [(worker_pb2_grpc.add_WorkerServiceServicer_to_server, servicer, SERVICE_NAME)],
            served,
            auth=auth,
            tls=tls,
        )
    except BaseException:
        engine.group.close()
        raise
    worker = WorkerServer(server, engine_loop, servicer, instance_id)
    engine_loop.start()  # after `worker` exists: a failed step stops it
    log.info(
        "worker %s (rank %d of %d) serves %s on %s:%d",
        instance_id,
        spec.rank,
        spec.size,
        engine.model_config.name,
        host,
        server.port,
    )
    return worker
