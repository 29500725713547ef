"""The client SDK: sync and asyncio streaming on a real cluster, cancellation, errors as NanocpError subclasses, and
the retry rule (UNAVAILABLE before the first chunk only), checked against a scripted router."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from conftest import HOST, Cluster
from opentelemetry.sdk.trace import TracerProvider

from nanocp.client import (
    AsyncClient,
    Client,
    DeadlineExceeded,
    InvalidArgument,
    NanocpError,
    NotFound,
    Unavailable,
)
from nanocp.v1 import common_pb2, router_pb2, router_pb2_grpc


async def test_sync_client_streams_a_completion(cluster: Cluster) -> None:
    def run() -> list[Any]:
        with Client(cluster.address) as client:
            return list(client.generate("Hi", max_tokens=6, ignore_eos=True))

    chunks = await asyncio.to_thread(run)
    assert chunks[0].placement is not None and chunks[0].placement.home == "w0"
    assert sum(len(c.token_ids) for c in chunks) == 6
    assert chunks[-1].finish_reason == "length"


async def test_sync_stream_cancel_frees_the_request_pages(cluster: Cluster) -> None:
    def run() -> None:
        with Client(cluster.address) as client:
            stream = client.generate([1, 2, 3], max_tokens=900, ignore_eos=True)
            next(stream)
            stream.cancel()
            assert list(stream) == [], "a cancelled stream ends quietly"

    await asyncio.to_thread(run)
    await cluster.wait_all_pages_free()


async def test_leaving_an_async_stream_block_frees_the_request_pages(cluster: Cluster) -> None:
    async with cluster.client.generate([1, 2, 3], max_tokens=900, ignore_eos=True) as stream:
        await anext(stream)
        assert (await cluster.instances())["w0"].home_batch == 1
    await cluster.wait_all_pages_free()


async def test_sync_errors_carry_the_status_code_and_message(cluster: Cluster) -> None:
    def run() -> None:
        with Client(cluster.address) as client:
            client.abort("missing")

    with pytest.raises(NotFound) as caught:
        await asyncio.to_thread(run)
    assert caught.value.code == grpc.StatusCode.NOT_FOUND
    assert "'missing'" in caught.value.message and str(caught.value).startswith("NOT_FOUND: ")


async def test_sync_list_instances_and_abort_by_the_stream_request_id(cluster: Cluster) -> None:
    def run() -> list[Any]:
        with Client(cluster.address) as client:
            assert [i.id for i in client.list_instances().instances] == ["w0"]
            stream = client.generate([1, 2], max_tokens=900, ignore_eos=True)
            chunks = [next(stream)]
            client.abort(stream.request_id)
            return chunks + list(stream)

    chunks = await asyncio.to_thread(run)
    assert chunks[-1].finish_reason == "abort"
    await cluster.wait_all_pages_free()


async def test_async_client_invalid_argument_names_the_field(cluster: Cluster) -> None:
    with pytest.raises(InvalidArgument, match=r"sampling\.top_p"):
        async for _ in cluster.client.generate([1], top_p=2.0):
            pass


class ScriptedRouter(router_pb2_grpc.RouterServiceServicer):
    """Fails the first `failures` Generate calls with `code`, then streams `chunks` chunks, then maybe fails again."""

    def __init__(self, failures: int, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE, chunks: int = 2) -> None:
        self.failures = failures
        self.code = code
        self.chunks = chunks
        self.fail_after_chunks = False
        self.stall = False
        self.calls = 0
        self.metadata: list[dict[str, str]] = []
        self.request_ids: list[str] = []

    async def Generate(
        self, request: router_pb2.GenerateRequest, context: Any
    ) -> AsyncIterator[router_pb2.GenerateResponse]:
        self.calls += 1
        self.metadata.append(dict(context.invocation_metadata()))
        self.request_ids.append(request.request_id)
        if self.stall:
            await asyncio.sleep(60)
        if self.calls <= self.failures:
            await context.abort(self.code, f"scripted failure {self.calls}")
        for i in range(self.chunks):
            yield router_pb2.GenerateResponse(request_id=request.request_id, token_ids=[i])
        if self.fail_after_chunks:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the home failed mid-stream")
            return
        yield router_pb2.GenerateResponse(request_id=request.request_id, finish_reason=common_pb2.FINISH_REASON_LENGTH)


@pytest.fixture
async def scripted() -> AsyncIterator[tuple[ScriptedRouter, str]]:
    router = ScriptedRouter(failures=0)
    server = grpc.aio.server()
    router_pb2_grpc.add_RouterServiceServicer_to_server(router, server)
    port = server.add_insecure_port(f"{HOST}:0")
    await server.start()
    yield router, f"{HOST}:{port}"
    await server.stop(None)


async def test_unavailable_before_the_first_chunk_is_retried(scripted: tuple[ScriptedRouter, str]) -> None:
    router, address = scripted
    router.failures = 2
    async with AsyncClient(address, retry_backoff_s=0.01) as client:
        chunks = [c async for c in client.generate([1])]
    assert router.calls == 3
    assert [t for c in chunks for t in c.token_ids] == [0, 1] and chunks[-1].finish_reason == "length"


async def test_sync_client_retries_unavailable_before_the_first_chunk(scripted: tuple[ScriptedRouter, str]) -> None:
    router, address = scripted
    router.failures = 1

    def run() -> list[Any]:
        with Client(address, retry_backoff_s=0.01) as client:
            return list(client.generate([1]))

    assert (await asyncio.to_thread(run))[-1].finish_reason == "length"
    assert router.calls == 2


async def test_retries_stop_after_max_retries(scripted: tuple[ScriptedRouter, str]) -> None:
    router, address = scripted
    router.failures = 100
    async with AsyncClient(address, max_retries=2, retry_backoff_s=0.01) as client:
        with pytest.raises(Unavailable, match="scripted failure 3"):
            async for _ in client.generate([1]):
                pass
    assert router.calls == 3


async def test_unavailable_after_a_chunk_is_not_retried(scripted: tuple[ScriptedRouter, str]) -> None:
    router, address = scripted
    router.fail_after_chunks = True
    received = []
    async with AsyncClient(address, retry_backoff_s=0.01) as client:
        with pytest.raises(Unavailable, match="mid-stream"):
            async for chunk in client.generate([1]):
                received.append(chunk)
    assert router.calls == 1 and len(received) == 2


async def test_other_errors_are_not_retried(scripted: tuple[ScriptedRouter, str]) -> None:
    router, address = scripted
    router.failures, router.code = 1, grpc.StatusCode.RESOURCE_EXHAUSTED
    async with AsyncClient(address, retry_backoff_s=0.01) as client:
        with pytest.raises(NanocpError) as caught:
            async for _ in client.generate([1]):
                pass
    assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and router.calls == 1


async def test_timeout_is_the_deadline_of_the_whole_stream(scripted: tuple[ScriptedRouter, str]) -> None:
    router, address = scripted
    router.stall = True
    async with AsyncClient(address) as client:
        with pytest.raises(DeadlineExceeded):
            async for _ in client.generate([1], timeout=0.2):
                pass


async def test_the_same_request_id_is_sent_on_every_attempt(scripted: tuple[ScriptedRouter, str]) -> None:
    router, address = scripted
    router.failures = 1
    async with AsyncClient(address, retry_backoff_s=0.01) as client:
        stream = client.generate([1])
        chunks = [c async for c in stream]
    assert router.request_ids == [stream.request_id] * 2
    assert {c.request_id for c in chunks} == {stream.request_id}


async def test_current_trace_context_is_sent_to_the_router(scripted: tuple[ScriptedRouter, str]) -> None:
    router, address = scripted
    tracer = TracerProvider().get_tracer("test")
    async with AsyncClient(address) as client:
        with tracer.start_as_current_span("caller") as span:
            stream = client.generate([1])
        chunks = [c async for c in stream]  # read outside the span: the context was taken at generate()
    assert chunks[-1].finish_reason == "length"
    trace_id = format(span.get_span_context().trace_id, "032x")
    assert trace_id in router.metadata[0]["traceparent"]
