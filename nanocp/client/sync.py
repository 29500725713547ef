"""The blocking client: `with Client("host:port") as c: for chunk in c.generate("Hi"): ...`."""

from __future__ import annotations

import time
from collections.abc import Iterator
from types import TracebackType

import grpc

from nanocp.client._call import ClientBase, StreamBase
from nanocp.client.chunk import Chunk
from nanocp.client.errors import error_from_rpc
from nanocp.v1 import router_pb2


class Stream(StreamBase, Iterator[Chunk]):
    """The chunks of one request. `cancel()` (or leaving a `with` block) stops it and frees its KV pages."""

    def __next__(self) -> Chunk:
        while not self._state.closed:
            call = self._attempt()
            try:
                return self._state.chunk(next(call))
            except StopIteration:
                self._state.closed = True
            except grpc.RpcError as exc:
                if self._state.closed:  # cancel() from another thread
                    break
                delay = self._state.retry_delay(exc)
                self._call = None
                time.sleep(delay)
        raise StopIteration

    close = StreamBase.cancel

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()


class Client(ClientBase[Stream]):
    """A blocking client of the nanocp router at `target` ("host:port")."""

    _channels = grpc
    _stream_type = Stream

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
