"""Failures in OpenAI's JSON error shape, {"error": {"message", "type", "param", "code"}}, with the HTTP status a
client acts on: 400 fix the request, 404 wrong model or path, 429 retry later, 503 no worker ready.

The message is the gRPC face's, word for word: both faces run the one validation.
"""

from __future__ import annotations

from http import HTTPStatus

import grpc
from fastapi.responses import JSONResponse

from nanocp.router.errors import NeverFits, RequestError

_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: HTTPStatus.BAD_REQUEST,
    grpc.StatusCode.UNAUTHENTICATED: HTTPStatus.UNAUTHORIZED,
    grpc.StatusCode.NOT_FOUND: HTTPStatus.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS: HTTPStatus.CONFLICT,
    grpc.StatusCode.RESOURCE_EXHAUSTED: HTTPStatus.TOO_MANY_REQUESTS,
    grpc.StatusCode.UNAVAILABLE: HTTPStatus.SERVICE_UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED: HTTPStatus.GATEWAY_TIMEOUT,
}
_TYPE = {
    HTTPStatus.BAD_REQUEST: "invalid_request_error",
    HTTPStatus.NOT_FOUND: "not_found_error",
    HTTPStatus.CONFLICT: "invalid_request_error",
    HTTPStatus.TOO_MANY_REQUESTS: "rate_limit_error",
    HTTPStatus.SERVICE_UNAVAILABLE: "service_unavailable_error",
    HTTPStatus.GATEWAY_TIMEOUT: "timeout_error",
}


class ModelNotFound(RequestError):
    def __init__(self, asked: str, served: str) -> None:
        super().__init__(
            grpc.StatusCode.NOT_FOUND, f"the model {asked!r} does not exist here; this router serves {served!r}"
        )


def http_status(error: RequestError) -> HTTPStatus:
    if isinstance(error, NeverFits):
        return HTTPStatus.BAD_REQUEST
    return _STATUS.get(error.code, HTTPStatus.INTERNAL_SERVER_ERROR)


def error_body(error: RequestError) -> dict[str, object]:
    status = http_status(error)
    code = "model_not_found" if isinstance(error, ModelNotFound) else error.code.name.lower()
    return {"error": {"message": error.message, "type": _TYPE.get(status, "server_error"), "param": None, "code": code}}


def error_response(error: RequestError) -> JSONResponse:
    return JSONResponse(error_body(error), status_code=http_status(error))
