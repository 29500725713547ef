"""The public API (nanocp.v1.RouterService): validate, admit, relay the home worker's token stream.

Whatever ends a Generate (the last token, an error, the client cancelling or its deadline passing, an Abort), the
home's Submit call is cancelled if still open, which makes the worker abort the request and free its pages, and the
router releases what it committed. An aborted request's stream ends cleanly: a last message with
FINISH_REASON_ABORT and the usage so far (no error status), so the caller keeps the tokens it already has.

When the home's group fails mid-stream, the request moves to a healthy group and the stream goes on
(nanocp.router.migration); it ends UNAVAILABLE only when it may not move.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

import grpc
from opentelemetry import trace
from opentelemetry.context import Context

from nanocp.auth import ANYONE, BearerAuth, Caller
from nanocp.internal.v1 import worker_pb2
from nanocp.model_config import ModelConfig
from nanocp.placement import Footprint, Placement, growth_pages
from nanocp.router import DEFAULT_MAX_MIGRATIONS
from nanocp.router.accounting import Ledger
from nanocp.router.admission import Admission, Withdrawn
from nanocp.router.errors import REQUEST_STATUSES, RequestError, StopRequested
from nanocp.router.growth import grow
from nanocp.router.listing import list_instances
from nanocp.router.metrics import LatencyMetrics, MigrationMetrics
from nanocp.router.migration import GroupLost, Migrator
from nanocp.router.registry import Instance, LossReason, WorkerRegistry
from nanocp.router.validation import check_request_id, validate
from nanocp.telemetry import extract_context, inject_metadata, placement_attributes
from nanocp.tokenizer import IncrementalDecoder, Tokenizer
from nanocp.v1 import common_pb2, router_pb2, router_pb2_grpc
from nanocp.wire import finish_reason_name, placement_to_proto

SERVICE_NAME = router_pb2.DESCRIPTOR.services_by_name["RouterService"].full_name


@dataclass(eq=False)
class _Live:
    """A request between validation and its last message."""

    request_id: str
    prompt: list[int]
    sampling: common_pb2.SamplingParams  # every field resolved
    decoder: IncrementalDecoder | None  # its text so far, across moves
    generated: list[int] = field(default_factory=list)  # the tokens streamed so far
    migrations: int = 0  # moves to another group after its group failed
    migrated_from: str = ""  # the home it last moved away from
    owner: str = ""  # the token that created it (nanocp.auth.Caller.owner): only it, or an admin, may see or abort it
    placement: Placement | None = None  # None while it waits for KV memory
    placement_changed: bool = False  # the next message tells the client its placement (it grew or moved)
    arrived: float = field(default_factory=time.perf_counter)
    first_token_at: float = 0.0
    call: Any = None  # the home's Submit call, once placed
    aborted: bool = False
    lost: GroupLost | None = None  # why the router gave up on the home's group mid-stream

    @property
    def footprint(self) -> Footprint:
        """What the rest of it needs (all of it before the first token): prompt + tokens streamed so far, and the
        rest of max_tokens; the same positions as the whole request."""
        done = len(self.generated)
        return Footprint(len(self.prompt) + done, self.sampling.max_tokens - done)

    @property
    def completion_tokens(self) -> int:
        return len(self.generated)

    def submit(self) -> worker_pb2.SubmitRequest:
        """The home's Submit for the rest of the request: after a move, the tokens streamed so far end its prompt,
        and their count tells the worker where its sampler's draws go on (nanocp.router.migration)."""
        assert self.placement is not None
        sampling = common_pb2.SamplingParams()
        sampling.CopyFrom(self.sampling)
        sampling.max_tokens = self.footprint.max_tokens
        return worker_pb2.SubmitRequest(
            request_id=self.request_id,
            prompt_token_ids=self.prompt + self.generated,
            sampling=sampling,
            placement=placement_to_proto(self.placement),
            tokens_generated=len(self.generated),
        )

    def finish(self, reason: common_pb2.FinishReason.ValueType) -> router_pb2.GenerateResponse:
        response = router_pb2.GenerateResponse(request_id=self.request_id, finish_reason=reason)
        response.usage.prompt_tokens = len(self.prompt)
        response.usage.completion_tokens = self.completion_tokens
        return response


class RouterServicer(router_pb2_grpc.RouterServiceServicer):
    def __init__(
        self,
        model: ModelConfig,
        tokenizer: Tokenizer | None,
        registry: WorkerRegistry,
        ledger: Ledger,
        admission: Admission,
        tracer: trace.Tracer,
        reserve_output_tokens: int | None = None,
        max_migrations: int = DEFAULT_MAX_MIGRATIONS,
        auth: BearerAuth | None = None,
    ) -> None:
        """`reserve_output_tokens`: place each request for its prompt and this many new tokens (not max_tokens),
        and grow its placement as it decodes; None places every request for max_tokens at once.
        `max_migrations`: how often a request may move to another group after its group failed (0: never).
        `auth`: whose token a call presents, which decides the requests it may see and abort (without it every
        caller may)."""
        self._reserve = reserve_output_tokens
        self._auth = auth
        self.latency = LatencyMetrics(model.name)
        metrics = MigrationMetrics(self.latency.registry)
        self.migrator = Migrator(max_migrations, admission, registry, metrics, reserve_output_tokens)
        self._model = model
        self._tokenizer = tokenizer
        self._registry = registry
        self._ledger = ledger
        self._admission = admission
        self._tracer = tracer
        self._live: dict[str, _Live] = {}
        self.draining = False  # shutting down: no new request; the live ones finish
        self._growths: set[asyncio.Task[None]] = set()  # kept referenced until done

    async def Generate(
        self, request: router_pb2.GenerateRequest, context: Any
    ) -> AsyncIterator[router_pb2.GenerateResponse]:
        try:
            parent = extract_context(context.invocation_metadata())
            caller = self.caller(context.invocation_metadata())
            async with aclosing(self.generate(request, context, parent, caller=caller)) as responses:
                async for response in responses:
                    yield response
        except RequestError as exc:
            await context.abort(exc.code, exc.message)

    async def generate(
        self,
        request: router_pb2.GenerateRequest,
        deadline: Any,
        parent: Context,
        operation: str = "text_completion",
        caller: Caller = ANYONE,
    ) -> AsyncGenerator[router_pb2.GenerateResponse]:
        """The one request path of every face (gRPC Generate, the HTTP API in nanocp.router.http): validation,
        admission, placement, the relay, tracing and metrics. Raises RequestError.

        `deadline` answers time_remaining() (a grpc context does; None: no deadline); `parent` is the caller's trace
        context; `operation` the GenAI operation name (text_completion, chat); `caller` whose token it came with
        (nanocp.auth), who alone (or an admin) may see and abort it.
        """
        # Follows the OpenTelemetry GenAI conventions; the worker's span becomes its child through the call metadata.
        span = self._tracer.start_span(
            f"{operation} {self._model.name}",
            context=parent,
            kind=trace.SpanKind.SERVER,
            attributes={"gen_ai.operation.name": operation, "gen_ai.request.model": self._model.name},
        )
        # Ended by hand, never made current: grpc may close this generator from another context. The inner
        # generators are closed explicitly (aclosing) so their cleanup runs now, whichever way the stream ends.
        try:
            async with aclosing(self._generate(request, deadline, span, caller)) as responses:
                async for response in responses:
                    yield response
        except RequestError as exc:
            span.set_attribute("error.type", exc.code.name)
            span.set_status(trace.StatusCode.ERROR, exc.message)
            raise
        except StopRequested:  # the stream ends here; closing the relay (above) aborted the request
            span.set_attribute("gen_ai.response.finish_reasons", ["stop"])
        except (asyncio.CancelledError, GeneratorExit):
            span.set_attribute("error.type", "CANCELLED")
            span.set_status(trace.StatusCode.ERROR, "cancelled by the client or its deadline")
            raise
        finally:
            span.end()

    async def _generate(
        self, request: router_pb2.GenerateRequest, context: Any, span: trace.Span, caller: Caller
    ) -> AsyncGenerator[router_pb2.GenerateResponse]:
        if self.draining:  # UNAVAILABLE: the SDK retries it, on another router behind the Service
            raise RequestError(grpc.StatusCode.UNAVAILABLE, "the router is shutting down; it takes no new request")
        valid = validate(request, self._model, self._tokenizer)
        request_id = request.request_id or uuid.uuid4().hex
        if request_id in self._live:
            raise RequestError(grpc.StatusCode.ALREADY_EXISTS, f"request_id {request_id!r} is already live")
        span.set_attributes(
            {
                "gen_ai.response.id": request_id,
                "gen_ai.request.max_tokens": valid.sampling.max_tokens,
                "gen_ai.request.temperature": valid.sampling.temperature,
                "gen_ai.request.top_p": valid.sampling.top_p,
                "gen_ai.request.top_k": valid.sampling.top_k,
                "gen_ai.usage.input_tokens": len(valid.prompt),
            }
        )
        decoder = IncrementalDecoder(self._tokenizer) if self._tokenizer is not None else None
        live = self._live[request_id] = _Live(request_id, valid.prompt, valid.sampling, decoder, owner=caller.owner)
        first = valid.footprint.reserved(self._reserve)
        try:
            try:
                live.placement = await self._admission.admit(request_id, first, valid.footprint)
            except Withdrawn:
                live.aborted = True
            if live.placement is None or live.aborted:  # while queued, or between its placement and now
                yield self._finished(live, common_pb2.FINISH_REASON_ABORT, span)
                return
            span.set_attributes(placement_attributes(live.placement))
            while not live.aborted:
                try:
                    async with aclosing(self._relay(live, context, span)) as responses:
                        async for response in responses:
                            yield response
                    return
                except GroupLost as lost:
                    await self._move(live, lost, context, span)
            yield self._finished(live, common_pb2.FINISH_REASON_ABORT, span)  # aborted while it moved
        finally:
            span.set_attribute("gen_ai.usage.output_tokens", live.completion_tokens)
            del self._live[request_id]
            if live.placement is not None:
                self.latency.placed(live.placement.cp_degree)  # the degree it ended with, after any growth
                self._admission.release(live.placement)

    async def _relay(self, live: _Live, context: Any, span: trace.Span) -> AsyncGenerator[router_pb2.GenerateResponse]:
        """The home worker's stream as GenerateResponses: placement first (again when it changed), text deltas,
        finish and usage last. Raises GroupLost when the home's group fails under it."""
        assert live.placement is not None
        home = self._registry.get(live.placement.home)
        submit = live.submit()
        metadata = inject_metadata(trace.set_span_in_context(span))
        live.call = home.stub.Submit(submit, timeout=context.time_remaining(), metadata=metadata)
        try:
            async for output in live.call:
                response = router_pb2.GenerateResponse(request_id=live.request_id, token_ids=output.token_ids)
                if live.decoder is not None:
                    response.text = live.decoder.push(list(output.token_ids))
                if live.completion_tokens == 0 or live.placement_changed:
                    response.placement.CopyFrom(placement_to_proto(live.placement))
                    live.placement_changed = False
                if live.completion_tokens == 0 and output.token_ids:
                    span.add_event("first_token")
                    live.first_token_at = time.perf_counter()
                    self.latency.first_token(live.first_token_at - live.arrived, span)
                if output.needs_pages:
                    growth = asyncio.create_task(self._grow(live, home, span))
                    self._growths.add(growth)
                    growth.add_done_callback(self._growths.discard)
                live.generated.extend(output.token_ids)
                if output.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED:
                    self.latency.finished(time.perf_counter() - live.first_token_at, live.completion_tokens, span)
                    response.MergeFrom(self._finished(live, output.finish_reason, span))
                    yield response
                    return
                yield response
        except asyncio.CancelledError:
            # Abort and a lost group cancel the call itself; a cancellation of this task (client, deadline) is
            # passed on.
            task = asyncio.current_task()
            if (task is not None and task.cancelling()) or not (live.aborted or live.lost):
                raise
            if live.lost is not None:
                raise live.lost from None
            yield self._finished(live, common_pb2.FINISH_REASON_ABORT, span)
            return
        except grpc.aio.AioRpcError as exc:
            raise self._worker_failure(home, exc) from exc
        finally:
            live.call.cancel()  # a no-op once the stream ended; otherwise the worker aborts and frees the pages
        raise self._worker_failure(home, None)

    async def _move(self, live: _Live, lost: GroupLost, context: Any, span: trace.Span) -> None:
        """Places a request whose group failed on a healthy group; raises `lost` when it may not move."""
        failed, live.placement, live.call, live.lost = live.placement, None, None, None
        assert failed is not None
        try:
            live.placement = await self.migrator.move(live, failed, lost, context.time_remaining(), span)
        except Withdrawn:  # aborted while it waited for room
            live.aborted = True
            return
        live.placement_changed = True
        span.set_attributes(placement_attributes(live.placement))

    async def _grow(self, live: _Live, home: Instance, span: trace.Span) -> None:
        """Grows a request's placement when its home asks; tells the home, which ends it if there is no room."""
        if live.placement is None or home.info is None or live.placement.home != home.id:
            return  # it ended, or moved away from the home that asked
        page_size = home.info.page_size
        loads = [self._ledger.load(i) for i in self._registry.placeable()]
        pages = growth_pages(live.placement.shards, live.footprint, page_size, self._reserve)
        grown = grow(self._admission.policy, live.placement, live.footprint, self._reserve, loads, page_size)
        if grown is not None:
            self._ledger.swap(live.placement, grown)
            live.placement, live.placement_changed = grown, True
            span.add_event("placement_grown", {"nanocp.cp_degree": grown.cp_degree, "nanocp.pages": pages})
            span.set_attributes(placement_attributes(grown))
        extend = worker_pb2.ExtendRequest(request_id=live.request_id)
        if grown is not None:
            extend.placement.CopyFrom(placement_to_proto(grown))
        with contextlib.suppress(grpc.aio.AioRpcError):  # the request may have ended meanwhile
            await home.stub.Extend(extend, timeout=10)

    def _finished(
        self, live: _Live, reason: common_pb2.FinishReason.ValueType, span: trace.Span
    ) -> router_pb2.GenerateResponse:
        span.set_attribute("gen_ai.response.finish_reasons", [finish_reason_name(reason)])
        return live.finish(reason)

    def _worker_failure(self, home: Instance, exc: grpc.aio.AioRpcError | None) -> RequestError:
        if exc is not None and exc.code() in REQUEST_STATUSES:
            return RequestError(exc.code(), f"instance {home.id}: {exc.details()}")
        problem = f"{exc.code().name}: {exc.details()}" if exc is not None else "the stream ended without a finish"
        self._registry.mark_unavailable(home, f"a request stream failed ({problem})", "stream_failed")
        return GroupLost(
            home.name,
            "stream_failed",
            f"instance {home.name} failed mid-stream ({problem}); the request did not finish",
        )

    @property
    def live_requests(self) -> int:
        return len(self._live)

    def placements(self) -> list[Placement]:
        """The live requests' placements (queued ones have none yet)."""
        return [live.placement for live in self._live.values() if live.placement is not None]

    def lose_group(self, instance: Instance, problem: str, reason: LossReason) -> None:
        """Ends the relays of the streams homed on the lost instance's group (a stalled home would never end them
        itself); each moves to another group if it may."""
        homes = {i.id: i for i in self._registry.group_of(instance)}
        for live in self._live.values():
            if live.call is not None and live.placement is not None and live.placement.home in homes:
                home = homes[live.placement.home].name
                live.lost = GroupLost(
                    instance.name,
                    reason,
                    f"instance {home} became unavailable mid-stream ({instance.name}: {problem}); the request did "
                    "not finish",
                )
                live.call.cancel()

    def caller(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> Caller:
        """Who a call's token (`authorization: Bearer`, in gRPC metadata or HTTP headers) says it comes from."""
        caller = self._auth.caller(metadata) if self._auth is not None else ANYONE
        if caller is None:  # no valid token (gRPC's interceptor refuses those first; a token may be rotated out since)
            raise RequestError(
                grpc.StatusCode.UNAUTHENTICATED, "a valid token is needed: authorization: Bearer <token>"
            )
        return caller

    def _visible(self, caller: Caller) -> list[_Live]:
        """The live requests the caller may see and abort: its own, or all for an admin."""
        return [live for live in self._live.values() if caller.admin or live.owner == caller.owner]

    async def Abort(self, request: router_pb2.AbortRequest, context: Any) -> router_pb2.AbortResponse:
        try:
            check_request_id(request.request_id)
            live = next(
                (
                    v
                    for v in self._visible(self.caller(context.invocation_metadata()))
                    if v.request_id == request.request_id
                ),
                None,
            )
        except RequestError as exc:
            await context.abort(exc.code, exc.message)
        if live is None:  # another client's request is not found either: ids of others are not disclosed
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no live request with request_id {request.request_id!r}")
        else:
            live.aborted = True
            if live.call is not None:
                live.call.cancel()
            else:
                self._admission.withdraw(live.request_id)
        return router_pb2.AbortResponse()

    async def ListInstances(
        self, request: router_pb2.ListInstancesRequest, context: Any
    ) -> router_pb2.ListInstancesResponse:
        try:
            caller = self.caller(context.invocation_metadata())
        except RequestError as exc:
            await context.abort(exc.code, exc.message)
        return await list_instances(
            self._registry, self._ledger, self._admission, self.migrator.total, self._visible(caller)
        )
