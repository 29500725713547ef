"""The worker's internal gRPC API on a real tiny engine: streaming, engine refusals as statuses, abort and
cancellation freeing pages, info, load, health and reflection."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from conftest import HOST, wait_until
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from nanocp.internal.v1 import worker_pb2, worker_pb2_grpc
from nanocp.v1 import common_pb2
from nanocp.worker.engine import EngineConfig
from nanocp.worker.server import WorkerServer, serve_worker

CONFIG = EngineConfig(page_size=16, num_pages=32, max_step_tokens=64, max_running=8)


@pytest.fixture
async def worker() -> AsyncIterator[WorkerServer]:
    server = await serve_worker("tiny", CONFIG, HOST, 0, "w7")
    yield server
    await server.stop()


@pytest.fixture
async def stub(worker: WorkerServer) -> AsyncIterator[worker_pb2_grpc.WorkerServiceAsyncStub]:
    async with grpc.aio.insecure_channel(f"{HOST}:{worker.port}") as channel:
        yield worker_pb2_grpc.WorkerServiceStub(channel)  # type: ignore[misc]


def submit(request_id: str, prompt: list[int], **sampling: object) -> worker_pb2.SubmitRequest:
    return worker_pb2.SubmitRequest(
        request_id=request_id, prompt_token_ids=prompt, sampling=common_pb2.SamplingParams(**sampling)
    )


async def rest_of(call: grpc.aio.UnaryStreamCall) -> list[worker_pb2.SubmitResponse]:
    """The remaining replies of a call already read with read() (grpc.aio forbids mixing in async for)."""
    replies = []
    while (reply := await call.read()) is not grpc.aio.EOF:
        replies.append(reply)
    return replies


async def pages_in_use(stub: worker_pb2_grpc.WorkerServiceAsyncStub) -> int:
    return (await stub.GetLoad(worker_pb2.GetLoadRequest())).kv_pages_in_use


async def test_submit_streams_tokens_then_finish_and_usage(stub: worker_pb2_grpc.WorkerServiceAsyncStub) -> None:
    replies = [r async for r in stub.Submit(submit("a", [1, 2, 3], max_tokens=9, ignore_eos=True))]
    assert sum(len(r.token_ids) for r in replies) == 9
    assert all(r.finish_reason == common_pb2.FINISH_REASON_UNSPECIFIED for r in replies[:-1])
    assert replies[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert (replies[-1].usage.prompt_tokens, replies[-1].usage.completion_tokens) == (3, 9)


async def test_submit_stops_at_a_stop_token(stub: worker_pb2_grpc.WorkerServiceAsyncStub) -> None:
    greedy = [r async for r in stub.Submit(submit("a", [1, 2, 3], max_tokens=5, temperature=0, ignore_eos=True))]
    third = [t for r in greedy for t in r.token_ids][2]
    replies = [
        r async for r in stub.Submit(submit("b", [1, 2, 3], max_tokens=5, temperature=0, stop_token_ids=[third]))
    ]
    assert replies[-1].finish_reason == common_pb2.FINISH_REASON_STOP
    assert [t for r in replies for t in r.token_ids][-1] == third


@pytest.mark.parametrize(
    ("prompt", "sampling", "code", "words"),
    [
        pytest.param([400], {"max_tokens": 2}, grpc.StatusCode.INVALID_ARGUMENT, "outside the vocabulary", id="vocab"),
        pytest.param([], {"max_tokens": 2}, grpc.StatusCode.INVALID_ARGUMENT, "empty", id="empty"),
        pytest.param([1], {"max_tokens": 600}, grpc.StatusCode.RESOURCE_EXHAUSTED, "32 pages", id="too_large"),
    ],
)
async def test_engine_refusals_become_grpc_statuses(
    stub: worker_pb2_grpc.WorkerServiceAsyncStub,
    prompt: list[int],
    sampling: dict[str, int],
    code: grpc.StatusCode,
    words: str,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in stub.Submit(submit("x", prompt, **sampling)):
            pass
    assert caught.value.code() == code
    assert words in caught.value.details()


async def test_duplicate_running_request_id_is_already_exists(stub: worker_pb2_grpc.WorkerServiceAsyncStub) -> None:
    first = stub.Submit(submit("dup", [1], max_tokens=400, ignore_eos=True))
    await first.read()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in stub.Submit(submit("dup", [1], max_tokens=2)):
            pass
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    first.cancel()


async def test_abort_of_an_unknown_request_is_not_found(stub: worker_pb2_grpc.WorkerServiceAsyncStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Abort(worker_pb2.AbortRequest(request_id="ghost"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "'ghost'" in caught.value.details()


async def test_abort_ends_the_stream_with_abort_and_frees_pages(stub: worker_pb2_grpc.WorkerServiceAsyncStub) -> None:
    call = stub.Submit(submit("r", [1, 2], max_tokens=400, ignore_eos=True))
    await call.read()
    assert await pages_in_use(stub) > 0
    await stub.Abort(worker_pb2.AbortRequest(request_id="r"))
    rest = await rest_of(call)
    assert rest[-1].finish_reason == common_pb2.FINISH_REASON_ABORT
    assert await pages_in_use(stub) == 0


async def test_cancelled_submit_aborts_the_request_and_frees_its_pages(
    stub: worker_pb2_grpc.WorkerServiceAsyncStub,
) -> None:
    call = stub.Submit(submit("c", [1, 2], max_tokens=400, ignore_eos=True))
    await call.read()
    call.cancel()

    async def freed() -> bool:
        load = await stub.GetLoad(worker_pb2.GetLoadRequest())
        return load.kv_pages_in_use == 0 and load.running == 0

    await wait_until(freed, "the cancelled request's pages to be freed")


async def test_submit_past_its_deadline_frees_its_pages(stub: worker_pb2_grpc.WorkerServiceAsyncStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in stub.Submit(submit("d", [1, 2], max_tokens=400, ignore_eos=True), timeout=0.3):
            pass
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    async def freed() -> bool:
        return await pages_in_use(stub) == 0

    await wait_until(freed, "the expired request's pages to be freed")


async def test_get_info_describes_the_model_and_the_pool(stub: worker_pb2_grpc.WorkerServiceAsyncStub) -> None:
    info = await stub.GetInfo(worker_pb2.GetInfoRequest())
    assert (info.instance_id, info.model, info.vocab_size, info.max_context) == ("w7", "tiny", 384, 4096)
    assert (info.page_size, info.kv_pages_total) == (16, 32)


async def test_worker_serves_health_and_reflection(worker: WorkerServer) -> None:
    async with grpc.aio.insecure_channel(f"{HOST}:{worker.port}") as channel:
        health = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="nanocp.internal.v1.WorkerService")
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        replies = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        services = {s.name async for reply in replies for s in reply.list_services_response.service}
    assert "nanocp.internal.v1.WorkerService" in services


async def test_a_taken_port_is_a_clear_error(worker: WorkerServer) -> None:
    with pytest.raises(OSError, match=f"cannot listen on {HOST}:{worker.port}"):
        await serve_worker("tiny", CONFIG, HOST, worker.port, "w8")
