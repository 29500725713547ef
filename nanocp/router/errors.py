"""The one exception the router's parts raise for a request; the service turns it into the gRPC status."""

from __future__ import annotations

import grpc


class StopRequested(Exception):
    """Thrown into a `RouterServicer.generate` stream by a face that ends the request itself (the HTTP API on a stop
    string): the request is aborted on its workers as a cancelled one is, but its span ends as finished, reason
    stop, rather than as an error."""


class RequestError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class InvalidRequest(RequestError):
    def __init__(self, message: str) -> None:
        super().__init__(grpc.StatusCode.INVALID_ARGUMENT, message)


class NeverFits(RequestError):
    """RESOURCE_EXHAUSTED for a request too large for the cluster even when idle: retrying cannot help (HTTP 400),
    unlike a full admission queue or a placement that cannot grow (HTTP 429)."""

    def __init__(self, message: str) -> None:
        super().__init__(grpc.StatusCode.RESOURCE_EXHAUSTED, message)


# Worker statuses that describe the request, not the worker's health; any other failure makes the home UNAVAILABLE.
REQUEST_STATUSES = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.INTERNAL,
    }
)
