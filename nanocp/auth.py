"""Who may call a server: bearer tokens in the call's `authorization` metadata.

Tokens live in files (one a line; what a mounted Kubernetes Secret gives), read again whenever a file changes, so a
rotated Secret takes effect without a restart. The router's public API takes client tokens and admin tokens; a worker
takes the one internal token the router presents. Every method but grpc.health.v1 (what kubelet probes, without
metadata) needs a token once tokens are on; a refused call ends UNAUTHENTICATED before its request is even parsed.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health

AUTHORIZATION = "authorization"
BEARER = "bearer "
# Methods that answer without a token: a health check says no more than whether the port is open.
_OPEN_SERVICES = (f"/{health.SERVICE_NAME}/",)


class WatchedFile:
    """A file's bytes, read again when its modification time, size or inode changes (a Secret's atomic swap)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._seen: tuple[int, int, int] | None = None
        self._content = b""
        self.read()  # a missing or unreadable file is an error at start-up, not at the first call

    def read(self) -> bytes:
        stat = os.stat(self.path)  # follows the symlinks a Secret volume swaps
        seen = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        if seen != self._seen:
            self._content = self.path.read_bytes()
            self._seen = seen
        return self._content

    def changed(self) -> bool:
        before = self._seen
        self.read()
        return self._seen != before


class TokenFile:
    """Bearer tokens, one a line (blank lines and lines starting with # skipped)."""

    def __init__(self, path: Path) -> None:
        self._file = WatchedFile(path)
        self._parsed: tuple[bytes, list[bytes]] = (b"", [])
        if not self.tokens():
            raise ValueError(f"{path} holds no token")

    def tokens(self) -> list[bytes]:
        content = self._file.read()
        if content != self._parsed[0]:
            lines = (line.strip() for line in content.splitlines())
            self._parsed = (content, [line for line in lines if line and not line.startswith(b"#")])
        return self._parsed[1]

    def first(self) -> str:
        """The token a client presents (the first line)."""
        return self.tokens()[0].decode()

    def holds(self, presented: bytes) -> bool:
        # Compares against every token, each in constant time, so timing tells nothing about which one is near.
        return sum(hmac.compare_digest(presented, token) for token in self.tokens()) > 0


@dataclass(frozen=True)
class Caller:
    """Who made a call: `owner` names its token (a digest, never the token); an admin may act on any request."""

    owner: str
    admin: bool


# Every caller when tokens are off: the API behaves as before tokens existed (meant for loopback and trusted nets).
ANYONE = Caller(owner="", admin=True)


def presented_token(metadata: Sequence[tuple[str, str | bytes]] | None) -> bytes | None:
    for key, value in metadata or ():
        if key == AUTHORIZATION and isinstance(value, str) and value[: len(BEARER)].lower() == BEARER:
            return value[len(BEARER) :].strip().encode()
    return None


class BearerAuth:
    """Checks the `authorization: Bearer <token>` of a call against client tokens and admin tokens."""

    def __init__(self, tokens: TokenFile | None, admin_tokens: TokenFile | None = None) -> None:
        self._tokens = tokens
        self._admin = admin_tokens

    @property
    def enabled(self) -> bool:
        return self._tokens is not None or self._admin is not None

    def caller(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> Caller | None:
        """Who presented the call's token; None when tokens are on and it presented no valid one."""
        if not self.enabled:
            return ANYONE
        token = presented_token(metadata)
        if not token:
            return None
        admin = self._admin is not None and self._admin.holds(token)
        if not admin and (self._tokens is None or not self._tokens.holds(token)):
            return None
        return Caller(owner=hashlib.sha256(token).hexdigest()[:32], admin=admin)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses, UNAUTHENTICATED, every call without a valid token (health checks excepted)."""

    def __init__(self, auth: BearerAuth) -> None:
        self._auth = auth

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        metadata = handler_call_details.invocation_metadata
        if handler is None or method.startswith(_OPEN_SERVICES) or self._auth.caller(metadata) is not None:
            return handler
        return _refusal(handler)


_MESSAGE = "this call needs a valid token: send the metadata `authorization: Bearer <token>`"


def _refusal(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that ends the call UNAUTHENTICATED without parsing its request."""

    async def refuse(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, _MESSAGE)

    async def refuse_stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, _MESSAGE)
        yield  # unreachable: makes this an async generator, as a streaming handler must be

    if handler.request_streaming:
        make = (
            grpc.stream_stream_rpc_method_handler
            if handler.response_streaming
            else grpc.stream_unary_rpc_method_handler
        )
    else:
        make = (
            grpc.unary_stream_rpc_method_handler if handler.response_streaming else grpc.unary_unary_rpc_method_handler
        )
    return make(refuse_stream if handler.response_streaming else refuse)


class _TokenSource:
    def __init__(self, token: TokenFile | str) -> None:
        self._token = token

    def with_token(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        token = self._token.first() if isinstance(self._token, TokenFile) else self._token
        metadata = grpc.aio.Metadata(*(details.metadata or ()), (AUTHORIZATION, f"Bearer {token}"))
        return grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )


class _UnaryToken(_TokenSource, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await continuation(self.with_token(client_call_details), request)


class _StreamToken(_TokenSource, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await continuation(self.with_token(client_call_details), request)


def bearer_token(token: TokenFile | str) -> list[grpc.aio.ClientInterceptor]:
    """Interceptors that add `authorization: Bearer <token>` to every unary and server-streaming call of a channel
    (grpc.aio takes one interceptor per kind of call). A token file is read again when it changes, so a rotated
    token is sent from the next call on."""
    return [_UnaryToken(token), _StreamToken(token)]
