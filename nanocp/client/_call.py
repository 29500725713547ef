"""What the sync and asyncio clients share: the constructor and its channel, building the request, the deadline,
retries, and reading chunks. Only what must block or await differs between them (sync.py, aio.py)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar, Generic, TypeVar

import grpc
from opentelemetry import context as otel_context
from opentelemetry.context import Context

from nanocp.client.chunk import Chunk
from nanocp.client.errors import error_from_rpc
from nanocp.telemetry import Metadata, inject_metadata
from nanocp.v1 import common_pb2, router_pb2, router_pb2_grpc

StreamT = TypeVar("StreamT")


@dataclass(frozen=True)
class Credentials:
    """What a client presents: a bearer token (the router's --api-tokens) and TLS (on with `tls` or a `ca_file`;
    `ca_file` holds the PEM roots that signed the router's certificate, default the system's; `server_name` is the
    name to check the certificate for when the address is another, e.g. through a port-forward)."""

    token: str | None = None
    tls: bool = False
    ca_file: str | Path | None = None
    server_name: str | None = None

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        if not self.tls and self.ca_file is None:
            return None
        return grpc.ssl_channel_credentials(Path(self.ca_file).read_bytes() if self.ca_file else None)

    def channel_options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []

    def open_channel(self, target: str, channels: ModuleType) -> Any:
        """A channel to `target` made by `channels`: the grpc module (a blocking channel) or grpc.aio (an asyncio
        one), whose secure_channel and insecure_channel take the same arguments."""
        credentials = self.channel_credentials()
        if credentials is None:
            return channels.insecure_channel(target)
        return channels.secure_channel(target, credentials, self.channel_options())

    def metadata(self, context: Context | None = None) -> Metadata:
        """A call's metadata: the trace context, and the token."""
        metadata = inject_metadata(context)
        return (*metadata, ("authorization", f"Bearer {self.token}")) if self.token else metadata


@dataclass(frozen=True)
class Retry:
    """Retries a Generate that failed with UNAVAILABLE before any chunk arrived, with exponential backoff."""

    max_retries: int = 3
    backoff_s: float = 0.1
    max_backoff_s: float = 2.0


class StreamState:
    """One generate call across its attempts: the request, its deadline, and whether any chunk arrived yet."""

    def __init__(
        self, request: router_pb2.GenerateRequest, timeout: float | None, retry: Retry, credentials: Credentials
    ) -> None:
        self.request = request
        self._credentials = credentials
        self.closed = False
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._retry = retry
        self._attempts = 0
        self._received = False
        self._context = otel_context.get_current()  # the caller's trace, whichever thread reads the stream

    def call_options(self) -> tuple[float | None, Metadata]:
        """The timeout left and the metadata for the next attempt."""
        timeout = None if self._deadline is None else max(0.0, self._deadline - time.monotonic())
        return timeout, self._credentials.metadata(self._context)

    def chunk(self, response: router_pb2.GenerateResponse) -> Chunk:
        self._received = True
        return Chunk.from_proto(response)

    def retry_delay(self, exc: grpc.RpcError) -> float:
        """Seconds to wait before the next attempt; raises the call's NanocpError when it must not be retried."""
        delay = min(self._retry.backoff_s * 2**self._attempts, self._retry.max_backoff_s)
        retryable = (
            exc.code() == grpc.StatusCode.UNAVAILABLE
            and not self._received
            and self._attempts < self._retry.max_retries
            and (self._deadline is None or time.monotonic() + delay < self._deadline)
        )
        if not retryable:
            self.closed = True
            raise error_from_rpc(exc) from None
        self._attempts += 1
        return delay


class StreamBase:
    """The chunks of one request, without the reads that block or await: its call, started at the first read and
    again for each retry, and `cancel()`, which stops it and frees its KV pages."""

    def __init__(self, stub: Any, state: StreamState) -> None:
        self._stub = stub
        self._state = state
        self._call: Any = None

    @property
    def request_id(self) -> str:
        return self._state.request.request_id

    def _attempt(self) -> Any:
        """The current attempt's call, started if there is none (the first read, or one after a retryable error)."""
        if self._call is None:
            timeout, metadata = self._state.call_options()
            self._call = self._stub.Generate(self._state.request, timeout=timeout, metadata=metadata)
        return self._call

    def cancel(self) -> None:
        self._state.closed = True
        if self._call is not None:
            self._call.cancel()


class ClientBase(Generic[StreamT]):
    """Client and AsyncClient without their calls that block or await. A subclass names the grpc module its channel
    comes from (`_channels`) and the stream `generate` returns (`_stream_type`, also the type parameter, so a caller
    of Client.generate gets a Stream and of AsyncClient.generate an AsyncStream)."""

    _channels: ClassVar[ModuleType]
    _stream_type: Callable[[Any, StreamState], StreamT]

    def __init__(
        self,
        target: str,
        *,
        max_retries: int = 3,
        retry_backoff_s: float = 0.1,
        token: str | None = None,
        tls: bool = False,
        ca_file: str | Path | None = None,
        server_name: str | None = None,
    ) -> None:
        """`token`: sent as `authorization: Bearer`; `tls` (or a `ca_file` of PEM roots) connects over TLS, checking
        the router's certificate for `server_name` when given (else for the target's host)."""
        self._credentials = Credentials(token, tls, ca_file, server_name)
        self._channel = self._credentials.open_channel(target, self._channels)
        self._stub = router_pb2_grpc.RouterServiceStub(self._channel)
        self._retry = Retry(max_retries, retry_backoff_s)

    def generate(
        self,
        prompt: str | list[int],
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop_token_ids: Sequence[int] = (),
        ignore_eos: bool = False,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> StreamT:
        """Streams the completion of `prompt` (text, or token ids); the call starts when the stream is first read.
        Unset sampling settings take the router's defaults; `timeout` is the deadline of the whole stream in seconds.
        Errors raise NanocpError subclasses."""
        # Unset sampling fields stay unset, so the router applies its documented defaults.
        sampling = common_pb2.SamplingParams(
            max_tokens=max_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            stop_token_ids=stop_token_ids,
            ignore_eos=ignore_eos,
        )
        # An id chosen here lets the caller abort the request before its first chunk arrives.
        request = router_pb2.GenerateRequest(request_id=request_id or uuid.uuid4().hex, sampling=sampling)
        if isinstance(prompt, str):
            request.text = prompt
        else:
            request.token_ids.extend(prompt)
        return self._stream_type(self._stub, StreamState(request, timeout, self._retry, self._credentials))
