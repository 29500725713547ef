"""Errors the SDK raises: the router's gRPC status code and message, as one exception class per code."""

from __future__ import annotations

import grpc


class NanocpError(Exception):
    """A call to the router failed; `code` is the grpc.StatusCode and `message` the router's explanation."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


class InvalidArgument(NanocpError):
    """The request itself is wrong (the message names the field); retrying it will not help."""


class NotFound(NanocpError):
    """No live request has that id (Abort)."""


class AlreadyExists(NanocpError):
    """Another live request has that request_id."""


class ResourceExhausted(NanocpError):
    """The request can never fit, or the admission queue is full."""


class Unavailable(NanocpError):
    """No worker could serve the request, or its worker failed mid-stream."""


class DeadlineExceeded(NanocpError):
    """The timeout passed before the stream finished."""


class Cancelled(NanocpError):
    """The call was cancelled on the server side."""


class Unauthenticated(NanocpError):
    """The router wants a valid token (Client(..., token=...))."""


class Internal(NanocpError):
    """A bug or failure inside the router or a worker."""


_BY_CODE: dict[grpc.StatusCode, type[NanocpError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.INTERNAL: Internal,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
}


def error_from_rpc(exc: grpc.RpcError) -> NanocpError:
    code = exc.code()
    return _BY_CODE.get(code, NanocpError)(code, exc.details() or "")
