"""The public API (nanocp.v1.RouterService): validate, admit, relay the home worker's token stream.

Whatever ends a Generate (the last token, an error, the client cancelling or its deadline passing, an Abort), the
home's Submit call is cancelled if still open, which makes the worker abort the request and free its pages, and the
router releases what it committed. An aborted request's stream ends cleanly: a last message with
FINISH_REASON_ABORT and the usage so far (no error status), so the caller keeps the tokens it already has.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

import grpc
from opentelemetry import trace
from opentelemetry.util.types import AttributeValue

from nanocp.auth import ANYONE, BearerAuth, Caller
from nanocp.internal.v1 import worker_pb2
from nanocp.model_config import ModelConfig
from nanocp.placement import Footprint, Placement, growth_pages
from nanocp.router.accounting import Ledger
from nanocp.router.admission import Admission, Withdrawn
from nanocp.router.errors import RequestError
from nanocp.router.growth import grow
from nanocp.router.metrics import LatencyMetrics
from nanocp.router.registry import Instance, WorkerRegistry
from nanocp.router.validation import ValidRequest, validate
from nanocp.telemetry import extract_context, inject_metadata
from nanocp.tokenizer import IncrementalDecoder, Tokenizer
from nanocp.v1 import common_pb2, router_pb2, router_pb2_grpc
from nanocp.wire import finish_reason_name, placement_to_proto

SERVICE_NAME = router_pb2.DESCRIPTOR.services_by_name["RouterService"].full_name
# Ids are echoed in ListInstances and in error messages: unbounded ones would let one client's ids fill the 4 MB
# message limit of everyone's listing.
MAX_REQUEST_ID_CHARS = 256

# Worker statuses that describe the request, not the worker's health; any other failure makes the home UNAVAILABLE.
_REQUEST_STATUSES = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.INTERNAL,
    }
)


@dataclass(eq=False)
class _Live:
    """A request between validation and its last message."""

    request_id: str
    footprint: Footprint  # everything it may need
    owner: str = ""  # the token that created it (nanocp.auth.Caller.owner): only it, or an admin, may see or abort it
    placement: Placement | None = None  # None while it waits for KV memory
    placement_grew: bool = False  # the next message tells the client its grown placement
    arrived: float = field(default_factory=time.perf_counter)
    first_token_at: float = 0.0
    call: Any = None  # the home's Submit call, once placed
    completion_tokens: int = 0
    aborted: bool = False
    lost: str | None = None  # why the router gave up on the home's group mid-stream

    def finish(self, reason: common_pb2.FinishReason.ValueType) -> router_pb2.GenerateResponse:
        response = router_pb2.GenerateResponse(request_id=self.request_id, finish_reason=reason)
        response.usage.prompt_tokens = self.footprint.prompt_tokens
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
        auth: BearerAuth | None = None,
    ) -> None:
        """`reserve_output_tokens`: place each request for its prompt and this many new tokens (not max_tokens),
        and grow its placement as it decodes; None places every request for max_tokens at once. `auth`: whose
        token a call presents, which decides the requests it may see and abort (without it every caller may)."""
        self._reserve = reserve_output_tokens
        self._auth = auth
        self.latency = LatencyMetrics(model.name)
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
        # Follows the OpenTelemetry GenAI conventions; the worker's span becomes its child through the call metadata.
        span = self._tracer.start_span(
            f"text_completion {self._model.name}",
            context=extract_context(context.invocation_metadata()),
            kind=trace.SpanKind.SERVER,
            attributes={"gen_ai.operation.name": "text_completion", "gen_ai.request.model": self._model.name},
        )
        # Ended by hand, never made current: grpc may close this generator from another context. The inner
        # generators are closed explicitly (aclosing) so their cleanup runs now, whichever way the stream ends.
        try:
            async with aclosing(self._generate(request, context, span)) as responses:
                async for response in responses:
                    yield response
        except RequestError as exc:
            span.set_attribute("error.type", exc.code.name)
            span.set_status(trace.StatusCode.ERROR, exc.message)
            await context.abort(exc.code, exc.message)
        except (asyncio.CancelledError, GeneratorExit):
            span.set_attribute("error.type", "CANCELLED")
            span.set_status(trace.StatusCode.ERROR, "cancelled by the client or its deadline")
            raise
        finally:
            span.end()

    async def _generate(
        self, request: router_pb2.GenerateRequest, context: Any, span: trace.Span
    ) -> AsyncGenerator[router_pb2.GenerateResponse]:
        if self.draining:  # UNAVAILABLE: the SDK retries it, on another router behind the Service
            raise RequestError(grpc.StatusCode.UNAVAILABLE, "the router is shutting down; it takes no new request")
        valid = validate(request, self._model, self._tokenizer)
        _check_request_id(request.request_id)
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
        live = self._live[request_id] = _Live(request_id, valid.footprint, self._caller(context).owner)
        first = valid.footprint.reserved(self._reserve)
        try:
            try:
                live.placement = await self._admission.admit(request_id, first)
            except Withdrawn:
                live.aborted = True
            if live.placement is None or live.aborted:  # while queued, or between its placement and now
                yield self._finished(live, common_pb2.FINISH_REASON_ABORT, span)
                return
            span.set_attributes(_placement_attributes(live.placement))
            async with aclosing(self._relay(live, valid, context, span)) as responses:
                async for response in responses:
                    yield response
        finally:
            span.set_attribute("gen_ai.usage.output_tokens", live.completion_tokens)
            del self._live[request_id]
            if live.placement is not None:
                self.latency.placed(live.placement.cp_degree)  # the degree it ended with, after any growth
                self._admission.release(live.placement)

    async def _relay(
        self, live: _Live, valid: ValidRequest, context: Any, span: trace.Span
    ) -> AsyncGenerator[router_pb2.GenerateResponse]:
        """The home worker's stream as GenerateResponses: placement first, text deltas, finish and usage last."""
        assert live.placement is not None
        home = self._registry.get(live.placement.home)
        submit = worker_pb2.SubmitRequest(
            request_id=live.request_id,
            prompt_token_ids=valid.prompt,
            sampling=valid.sampling,
            placement=placement_to_proto(live.placement),
        )
        metadata = inject_metadata(trace.set_span_in_context(span))
        live.call = home.stub.Submit(submit, timeout=context.time_remaining(), metadata=metadata)
        decoder = IncrementalDecoder(self._tokenizer) if self._tokenizer is not None else None
        try:
            async for output in live.call:
                response = router_pb2.GenerateResponse(request_id=live.request_id, token_ids=output.token_ids)
                if decoder is not None:
                    response.text = decoder.push(list(output.token_ids))
                if live.completion_tokens == 0 or live.placement_grew:
                    response.placement.CopyFrom(placement_to_proto(live.placement))
                    live.placement_grew = False
                if live.completion_tokens == 0 and output.token_ids:
                    span.add_event("first_token")
                    live.first_token_at = time.perf_counter()
                    self.latency.first_token(live.first_token_at - live.arrived, span)
                if output.needs_pages:
                    growth = asyncio.create_task(self._grow(live, home, span))
                    self._growths.add(growth)
                    growth.add_done_callback(self._growths.discard)
                live.completion_tokens += len(output.token_ids)
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
                raise RequestError(
                    grpc.StatusCode.UNAVAILABLE,
                    f"instance {home.name} became unavailable mid-stream ({live.lost}); the request did not finish",
                ) from None
            yield self._finished(live, common_pb2.FINISH_REASON_ABORT, span)
            return
        except grpc.aio.AioRpcError as exc:
            raise self._worker_failure(home, exc) from exc
        finally:
            live.call.cancel()  # a no-op once the stream ended; otherwise the worker aborts and frees the pages
        raise self._worker_failure(home, None)

    async def _grow(self, live: _Live, home: Instance, span: trace.Span) -> None:
        """Grows a request's placement when its home asks; tells the home, which ends it if there is no room."""
        if live.placement is None or home.info is None:
            return
        page_size = home.info.page_size
        loads = [self._ledger.load(i) for i in self._registry.placeable()]
        pages = growth_pages(live.placement.shards, live.footprint, page_size, self._reserve)
        grown = grow(self._admission.policy, live.placement, live.footprint, self._reserve, loads, page_size)
        if grown is not None:
            self._ledger.swap(live.placement, grown)
            live.placement, live.placement_grew = grown, True
            span.add_event("placement_grown", {"nanocp.cp_degree": grown.cp_degree, "nanocp.pages": pages})
            span.set_attributes(_placement_attributes(grown))
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
        if exc is not None and exc.code() in _REQUEST_STATUSES:
            return RequestError(exc.code(), f"instance {home.id}: {exc.details()}")
        problem = f"{exc.code().name}: {exc.details()}" if exc is not None else "the stream ended without a finish"
        self._registry.mark_unavailable(home, f"a request stream failed ({problem})")
        return RequestError(
            grpc.StatusCode.UNAVAILABLE,
            f"instance {home.name} failed mid-stream ({problem}); the request did not finish",
        )

    @property
    def live_requests(self) -> int:
        return len(self._live)

    def placements(self) -> list[Placement]:
        """The live requests' placements (queued ones have none yet)."""
        return [live.placement for live in self._live.values() if live.placement is not None]

    def lose_group(self, instance: Instance, problem: str) -> None:
        """Ends the streams homed on the lost instance's group: a stalled home would never end them itself."""
        homes = {i.id for i in self._registry.group_of(instance)}
        for live in self._live.values():
            if live.call is not None and live.placement is not None and live.placement.home in homes:
                live.lost = f"{instance.name}: {problem}"
                live.call.cancel()

    def _caller(self, context: Any) -> Caller:
        caller = self._auth.caller(context.invocation_metadata()) if self._auth is not None else ANYONE
        if caller is None:  # the interceptor let the call in, but its token was rotated out since
            raise RequestError(grpc.StatusCode.UNAUTHENTICATED, "the call's token is no longer valid")
        return caller

    def _visible(self, caller: Caller) -> list[_Live]:
        """The live requests the caller may see and abort: its own, or all for an admin."""
        return [live for live in self._live.values() if caller.admin or live.owner == caller.owner]

    async def Abort(self, request: router_pb2.AbortRequest, context: Any) -> router_pb2.AbortResponse:
        try:
            _check_request_id(request.request_id)
            live = next((v for v in self._visible(self._caller(context)) if v.request_id == request.request_id), None)
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
            caller = self._caller(context)
        except RequestError as exc:
            await context.abort(exc.code, exc.message)
        await self._registry.refresh()
        response = router_pb2.ListInstancesResponse(
            queued=self._admission.queued, waited_total=self._admission.waited_total
        )
        for instance in self._registry.instances():
            problem = self._registry.problem(instance)
            status = response.instances.add(
                id=instance.id,
                address=instance.address,
                state=router_pb2.INSTANCE_STATE_UNAVAILABLE if problem else router_pb2.INSTANCE_STATE_READY,
                home_batch=self._ledger.home_batch(instance.id),
                kv_pages_committed=self._ledger.pages_committed(instance.id),
                kv_pages_in_use=instance.pages_in_use,
                problem=problem,
            )
            if instance.info is not None:
                status.kv_pages_total = instance.info.kv_pages_total
                status.page_size = instance.info.page_size
                status.group = instance.info.group
                status.rank = instance.info.rank
        for live in self._visible(caller):
            if live.placement is not None:
                response.requests.add(
                    request_id=live.request_id,
                    placement=placement_to_proto(live.placement),
                    prompt_tokens=live.footprint.prompt_tokens,
                    max_tokens=live.footprint.max_tokens,
                )
        return response


def _check_request_id(request_id: str) -> None:
    if len(request_id) > MAX_REQUEST_ID_CHARS:
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"request_id has {len(request_id)} characters; the limit is {MAX_REQUEST_ID_CHARS}",
        )


def _placement_attributes(placement: Placement) -> dict[str, AttributeValue]:
    return {
        "nanocp.home": placement.home,
        "nanocp.cp_degree": placement.cp_degree,
        "nanocp.shards": [shard.instance for shard in placement.shards],  # in position order, the tail last
    }
