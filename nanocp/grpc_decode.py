"""Answers a request message that does not parse (garbage, truncated) with INVALID_ARGUMENT, as a server interceptor.

grpc decodes a request before the servicer runs, and answers UNKNOWN when the decoder raises: the caller cannot
tell its own malformed bytes from a server bug. Here the decoder of every unary-request method returns an
`Undecodable` marker instead of raising, and the method aborts with INVALID_ARGUMENT when it receives one. A method
whose request parses runs as before.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError


@dataclass(frozen=True)
class Undecodable:
    why: str


def _tolerant(decode: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if decode is None:  # a method that takes raw bytes cannot be malformed
        return None

    def parse(raw: bytes) -> Any:
        try:
            return decode(raw)
        except DecodeError as exc:
            return Undecodable(str(exc) or "the request message does not parse")

    return parse


async def _refuse(context: grpc.aio.ServicerContext[Any, Any], bad: Undecodable) -> None:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed request message: {bad.why}")


def _unary_unary(behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    async def run(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        if isinstance(request, Undecodable):
            await _refuse(context, request)
        return await behavior(request, context)

    return run


def _unary_stream(behavior: Callable[..., Any]) -> Callable[..., Any]:
    if inspect.iscoroutinefunction(behavior):  # writes its responses with context.write
        return _unary_unary(behavior)

    async def run(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        if isinstance(request, Undecodable):
            await _refuse(context, request)
        # Closed with this generator (grpc closes it when the call ends early), so the method's own cleanup runs.
        async with contextlib.aclosing(behavior(request, context)) as responses:
            async for response in responses:
                yield response

    return run


def refusing_undecodable(handler: grpc.RpcMethodHandler | None) -> grpc.RpcMethodHandler | None:
    """The handler with its unary request's decoder made tolerant; streamed requests and synchronous methods (none
    in an aio server) are left as they were."""
    if handler is None or handler.request_streaming:
        return handler
    decode = _tolerant(handler.request_deserializer)
    if handler.response_streaming:
        streams = handler.unary_stream
        if not (inspect.isasyncgenfunction(streams) or inspect.iscoroutinefunction(streams)):
            return handler
        return grpc.unary_stream_rpc_method_handler(_unary_stream(streams), decode, handler.response_serializer)
    if not inspect.iscoroutinefunction(handler.unary_unary):
        return handler
    return grpc.unary_unary_rpc_method_handler(_unary_unary(handler.unary_unary), decode, handler.response_serializer)


class RefuseUndecodable(grpc.aio.ServerInterceptor):
    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        return refusing_undecodable(await continuation(handler_call_details))
