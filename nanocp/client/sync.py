"""The blocking client: `with Client("host:port") as c: for chunk in c.generate("Hi"): ...`."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc

from nanocp.client._call import Credentials, Retry, StreamState, generate_request
from nanocp.client.chunk import Chunk
from nanocp.client.errors import error_from_rpc
from nanocp.v1 import router_pb2, router_pb2_grpc


class Stream(Iterator[Chunk]):
    """The chunks of one request. `cancel()` (or leaving a `with` block) stops it and frees its KV pages."""

    def __init__(self, stub: Any, state: StreamState) -> None:
        self._stub = stub
        self._state = state
        self._call: Any = None

    @property
    def request_id(self) -> str:
        return self._state.request.request_id

    def __next__(self) -> Chunk:
        while not self._state.closed:
            if self._call is None:
                timeout, metadata = self._state.call_options()
                self._call = self._stub.Generate(self._state.request, timeout=timeout, metadata=metadata)
            try:
                return self._state.chunk(next(self._call))
            except StopIteration:
                self._state.closed = True
            except grpc.RpcError as exc:
                if self._state.closed:  # cancel() from another thread
                    break
                delay = self._state.retry_delay(exc)
                self._call = None
                time.sleep(delay)
        raise StopIteration

    def cancel(self) -> None:
        self._state.closed = True
        if self._call is not None:
            self._call.cancel()

    close = cancel

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()


class Client:
    """A blocking client of the nanocp router at `target` ("host:port")."""

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
        channel_credentials = self._credentials.channel_credentials()
        self._channel = (
            grpc.secure_channel(target, channel_credentials, self._credentials.channel_options())
            if channel_credentials is not None
            else grpc.insecure_channel(target)
        )
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
    ) -> Stream:
        """Streams the completion of `prompt` (text, or token ids). Unset sampling settings take the router's
        defaults; `timeout` is the deadline of the whole stream in seconds. Errors raise NanocpError subclasses."""
        request = generate_request(
            prompt,
            max_tokens=max_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            stop_token_ids=stop_token_ids,
            ignore_eos=ignore_eos,
            request_id=request_id,
        )
        return Stream(self._stub, StreamState(request, timeout, self._retry, self._credentials))

    def abort(self, request_id: str, *, timeout: float | None = None) -> None:
        """Stops a live request; its stream ends with finish_reason "abort". NotFound for an unknown id."""
        try:
            self._stub.Abort(
                router_pb2.AbortRequest(request_id=request_id), timeout=timeout, metadata=self._credentials.metadata()
            )
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None

    def list_instances(self, *, timeout: float | None = None) -> router_pb2.ListInstancesResponse:
        try:
            response: router_pb2.ListInstancesResponse = self._stub.ListInstances(
                router_pb2.ListInstancesRequest(), timeout=timeout, metadata=self._credentials.metadata()
            )
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
        return response

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()
