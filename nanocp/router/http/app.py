"""The routes of the HTTP API, over the router's one request path (RouterServicer.generate).

A body is checked and turned into its choices' requests (`requests`), run (`choices`) and answered whole or as SSE
(`responses`). A stream's status line waits for every choice's first event, so a request refused at validation or
admission gets its error status rather than a 200 with an error inside; once streaming, a failure is an error event.
A client that goes away aborts its choices: their workers free the KV pages at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.exceptions import HTTPException
from starlette.types import Receive, Scope, Send

from nanocp.model_config import ModelConfig
from nanocp.router.errors import InvalidRequest, RequestError
from nanocp.router.http.chat_template import ChatTemplate
from nanocp.router.http.choices import Choices, Delta, Failed
from nanocp.router.http.errors import error_response
from nanocp.router.http.requests import Plan, chat_plan, completion_plan
from nanocp.router.http.responses import DONE, Answer, Shape, sse_error
from nanocp.router.http.schema import ChatCompletionRequest, CompletionRequest
from nanocp.router.registry import WorkerRegistry
from nanocp.router.service import RouterServicer
from nanocp.telemetry import extract_context
from nanocp.tokenizer import Tokenizer
from nanocp.v1 import router_pb2

T = TypeVar("T")
CLIENT_CLOSED = 499  # the status of a response whose client went away first (nginx's); nobody reads it


class Api:
    """What the routes answer from: the servicer's request path and the model it serves."""

    def __init__(self, servicer: RouterServicer, model: str, tokenizer: Tokenizer | None) -> None:
        self.servicer = servicer
        self.model = model
        self.tokenizer = tokenizer

    def prompt_tokens(self, request: router_pb2.GenerateRequest) -> int:
        if request.token_ids or self.tokenizer is None:
            return len(request.token_ids)
        return len(self.tokenizer.encode(request.text))

    async def answer(self, http: Request, plan: Callable[[], Plan], chat: bool) -> Response:
        try:
            caller = self.servicer.caller(http.headers.items())  # the gRPC API's tokens, from the same header
            planned = plan()
        except RequestError as exc:
            return error_response(exc)
        parent = extract_context(http.headers.items())  # W3C traceparent, as gRPC metadata carries it
        operation = "chat" if chat else "text_completion"
        choices = Choices(self.servicer, planned.choices, planned.stop, parent, operation, self.prompt_tokens, caller)
        shape = Shape(chat, planned.id, self.model)
        streaming = False
        try:
            first = await _until_disconnected(http, _first_events(choices, len(planned.choices), planned.stream))
            if first is None:
                return Response(status_code=CLIENT_CLOSED)
            if planned.stream:  # from here on the response aborts the choices when it ends
                streaming = True
                return ChoicesStream(_sse(choices, first, planned, shape), choices)
            answers = [Answer() for _ in planned.choices]
            for event in first:
                answers[event.index].add(event)
            return JSONResponse(shape.whole(answers, planned.n))
        except RequestError as exc:
            return error_response(exc)
        finally:
            if not streaming:  # a failure, a client gone, or this handler cancelled (shutdown): abort the rest
                choices.cancel()


async def _first_events(choices: Choices, count: int, stream: bool) -> list[Delta]:
    """Events until every choice has sent one (a stream) or has finished (a whole answer); raises a failure."""
    events: list[Delta] = []
    waiting = set(range(count))
    while waiting:
        event = await choices.next()
        if event is None:
            break
        if isinstance(event, Failed):
            raise event.error
        events.append(event)
        if stream or event.finish_reason is not None:
            waiting.discard(event.index)
    return events


async def _disconnected(http: Request) -> None:
    """Returns when the client closes the connection (its body is read by now, so nothing else arrives)."""
    while (await http.receive())["type"] != "http.disconnect":
        pass


async def _until_disconnected(http: Request, work: Awaitable[T]) -> T | None:
    """`work`'s result, or None when the client went away first (then `work` is cancelled)."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(http))
    try:
        await asyncio.wait([task, watch], return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
    return task.result() if task.done() and not task.cancelled() else None


class ChoicesStream(StreamingResponse):
    """The SSE response of running choices, which aborts them however it ends: its last event sent, its client
    gone, or the server shutting down. The body's generator can't do it alone: when the connection fails as the
    status line goes out (an ASGI 2.4 server raises there), the generator never starts, so a `finally` in it never
    runs."""

    def __init__(self, events: AsyncIterator[str], choices: Choices) -> None:
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.choices = choices

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.choices.cancel()


async def _sse(choices: Choices, first: list[Delta], plan: Plan, shape: Shape) -> AsyncIterator[str]:
    answers = [Answer() for _ in plan.choices]
    started: set[int] = set()

    def chunks(event: Delta) -> list[str]:
        answers[event.index].add(event)
        opening = event.index not in started
        if not (opening or event.text or event.finish_reason):
            return []  # a token whose text is held back (an unfinished character, a possible stop string)
        started.add(event.index)
        return [shape.chunk(event.index, event.text, event.finish_reason, opening, plan.include_usage)]

    for delta in first:
        for chunk in chunks(delta):
            yield chunk
    while (event := await choices.next()) is not None:
        if isinstance(event, Failed):
            yield sse_error(event.error)
            break
        for chunk in chunks(event):
            yield chunk
    else:
        if plan.include_usage:
            yield shape.usage_chunk(answers, plan.n)
    yield DONE


def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    """FastAPI's 422 for a body of the wrong shape, as OpenAI's 400 naming the field."""
    assert isinstance(exc, RequestValidationError)  # the handler is registered for this type alone
    problems = [f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in exc.errors()[:3]]
    return error_response(InvalidRequest("; ".join(problems)))


def _http_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    code = grpc.StatusCode.NOT_FOUND if exc.status_code == 404 else grpc.StatusCode.INVALID_ARGUMENT
    response = error_response(RequestError(code, str(exc.detail)))
    response.status_code = exc.status_code
    return response


def create_app(
    servicer: RouterServicer,
    registry: WorkerRegistry,
    model_config: ModelConfig,
    tokenizer: Tokenizer | None,
    metrics: CollectorRegistry,
) -> FastAPI:
    """The API of `servicer`'s request path; `metrics` is served on /metrics."""
    model = model_config.name
    template = ChatTemplate.load(model_config)
    api = Api(servicer, model, tokenizer)
    app = FastAPI(title="nanocp", summary="OpenAI-compatible API of the nanocp router")
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)

    @app.get("/metrics")
    async def prometheus() -> Response:
        """The router's metrics, the endpoint picker's gauges among them, on the API's own port as vLLM has them."""
        return Response(generate_latest(metrics), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: Request) -> Response:
        return await api.answer(http, lambda: completion_plan(body, model), chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, http: Request) -> Response:
        return await api.answer(http, lambda: chat_plan(body, model, template), chat=True)

    @app.get("/v1/models")
    async def models(http: Request) -> Response:
        try:
            servicer.caller(http.headers.items())
        except RequestError as exc:
            return error_response(exc)
        card = {"id": model, "object": "model", "created": 0, "owned_by": "nanocp"}
        return JSONResponse({"object": "list", "data": [card]})

    @app.get("/health")
    async def health() -> Response:
        """200 while a worker takes requests, else 503: what a gateway's or Kubernetes' probe needs to know."""
        ready = len(registry.placeable())
        return JSONResponse({"ready_instances": ready}, status_code=200 if ready else 503)

    return app
