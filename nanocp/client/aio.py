"""The asyncio client: `async with AsyncClient("host:port") as c: async for chunk in c.generate("Hi"): ...`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from types import TracebackType

import grpc

from nanocp.client._call import ClientBase, StreamBase
from nanocp.client.chunk import Chunk
from nanocp.client.errors import error_from_rpc
from nanocp.v1 import router_pb2


class AsyncStream(StreamBase, AsyncIterator[Chunk]):
    """The chunks of one request. `cancel()` (or leaving an `async with` block) stops it and frees its KV pages."""

    async def __anext__(self) -> Chunk:
        while not self._state.closed:
            call = self._attempt()
            try:
                response = await call.read()
            except asyncio.CancelledError:
                # grpc.aio raises this when the call was cancelled locally; a cancelled task is passed on.
                task = asyncio.current_task()
                if not self._state.closed or (task is not None and task.cancelling()):
                    raise
                break
            except grpc.RpcError as exc:
                delay = self._state.retry_delay(exc)
                self._call = None
                await asyncio.sleep(delay)
                continue
            if response is grpc.aio.EOF:
                self._state.closed = True
                break
            return self._state.chunk(response)
        raise StopAsyncIteration

    async def aclose(self) -> None:
        self.cancel()

    async def __aenter__(self) -> AsyncStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cancel()


class AsyncClient(ClientBase[AsyncStream]):
    """An asyncio client of the nanocp router at `target` ("host:port"); create it inside the event loop."""

    _channels = grpc.aio
    _stream_type = AsyncStream

    async def abort(self, request_id: str, *, timeout: float | None = None) -> None:
        """Stops a live request; its stream ends with finish_reason "abort". NotFound for an unknown id."""
        try:
            await self._stub.Abort(
                router_pb2.AbortRequest(request_id=request_id), timeout=timeout, metadata=self._credentials.metadata()
            )
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None

    async def list_instances(self, *, timeout: float | None = None) -> router_pb2.ListInstancesResponse:
        try:
            response: router_pb2.ListInstancesResponse = await self._stub.ListInstances(
                router_pb2.ListInstancesRequest(), timeout=timeout, metadata=self._credentials.metadata()
            )
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
        return response

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        await self.close()
