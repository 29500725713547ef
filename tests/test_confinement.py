"""A failure stays with what caused it: a request whose row goes non-finite ends alone while its batch goes on; an
engine that can no longer be trusted to step (a command raised) ends every stream, stops serving and lets its
process exit, rather than hanging requests behind a READY health check."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
import torch
from conftest import HOST, wait_until
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nanocp.internal.v1 import worker_pb2, worker_pb2_grpc
from nanocp.v1 import common_pb2
from nanocp.worker.engine import Engine, EngineConfig
from nanocp.worker.model_runner import SampledTokens
from nanocp.worker.planner import StepInputs
from nanocp.worker.request import FinishReason, RequestOutput, SamplingParams
from nanocp.worker.server import SERVICE_NAME, WorkerServer, serve_worker

CONFIG = EngineConfig(page_size=4, num_pages=64, max_step_tokens=32, max_running=8)
PROMPTS = {"a": [1, 2, 3], "poisoned": [4, 5, 6, 7], "c": [8, 9]}


def run_batch(poison_after: int | None) -> dict[str, list[RequestOutput]]:
    """Runs the three requests together; with `poison_after`, the poisoned request's logits row turns NaN once it
    has that many tokens (as a numerical blow-up in its own activations would)."""
    engine = Engine.from_spec("tiny", CONFIG)
    outputs: dict[str, list[RequestOutput]] = {}
    launch, logits = engine.runner.launch, engine.runner.model.logits
    poisoned_rows: list[int] = []

    def launch_marking(inputs: StepInputs, previous: torch.Tensor | None) -> SampledTokens | None:
        poisoned_rows[:] = [
            i
            for i, chunk in enumerate(inputs.sampling_chunks)
            if chunk.request.request_id == "poisoned" and len(chunk.request.output) == poison_after
        ]
        return launch(inputs, previous)

    def nan_logits(hidden: torch.Tensor) -> torch.Tensor:
        out = logits(hidden)
        out[poisoned_rows] = float("nan")
        return out

    engine.runner.launch = launch_marking  # type: ignore[method-assign]
    engine.runner.model.logits = nan_logits  # type: ignore[method-assign]
    for request_id, prompt in PROMPTS.items():
        params = SamplingParams(temperature=0.8, seed=3, max_tokens=12, ignore_eos=True)
        engine.add_request(request_id, prompt, params, lambda out: outputs.setdefault(out.request_id, []).append(out))
    while engine.has_work():
        engine.step()
    return outputs


def tokens(outputs: list[RequestOutput]) -> list[int]:
    return [t for out in outputs for t in out.new_token_ids]


def test_a_request_whose_logits_go_nan_ends_internal_alone_and_its_batch_goes_on() -> None:
    clean, poisoned = run_batch(None), run_batch(poison_after=5)
    last = poisoned["poisoned"][-1]
    assert last.finish_reason == FinishReason.ABORT and last.error_code == "INTERNAL"
    assert last.error is not None and "non-finite logits" in last.error
    assert tokens(poisoned["poisoned"]) == tokens(clean["poisoned"])[:5], "what it streamed before stays"
    for bystander in ("a", "c"):
        assert poisoned[bystander][-1].finish_reason == FinishReason.LENGTH
        assert tokens(poisoned[bystander]) == tokens(clean[bystander])


@pytest.fixture
async def worker() -> AsyncIterator[WorkerServer]:
    config = EngineConfig(page_size=16, num_pages=128, max_step_tokens=32, max_running=8)
    server = await serve_worker("tiny", config, HOST, 0, "w9")
    yield server
    if server.failure is None:
        await server.stop()


async def health(address: str) -> int | None:
    """The worker's health status, or None once it no longer answers at all."""
    async with grpc.aio.insecure_channel(address) as channel:
        try:
            check = health_pb2_grpc.HealthStub(channel).Check  # type: ignore[no-untyped-call]
            reply = await check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5)
        except grpc.aio.AioRpcError:
            return None
    return int(reply.status)


async def test_a_raising_command_ends_every_stream_and_the_worker_stops_serving(worker: WorkerServer) -> None:
    address = f"{HOST}:{worker.port}"
    assert await health(address) == health_pb2.HealthCheckResponse.SERVING

    def broken_extend(*_: object) -> None:
        raise RuntimeError("injected bug in a command")

    worker.engine.extend = broken_extend  # type: ignore[method-assign]
    async with grpc.aio.insecure_channel(address) as channel:
        stub = worker_pb2_grpc.WorkerServiceStub(channel)  # type: ignore[no-untyped-call]
        sampling = common_pb2.SamplingParams(temperature=0.0, max_tokens=2000, ignore_eos=True)  # outlasts the test
        live = stub.Submit(worker_pb2.SubmitRequest(request_id="live", prompt_token_ids=[1, 2], sampling=sampling))
        await live.read()
        await stub.Extend(worker_pb2.ExtendRequest(request_id="live"))  # the command the engine thread runs raises
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            while await live.read() is not grpc.aio.EOF:
                pass
    assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "injected bug in a command" in str(ended.value.details())
    assert worker.failure is not None, "the process exits non-zero (nanocp.cli) for its supervisor to restart it"

    async def not_serving() -> bool:
        return await health(address) != health_pb2.HealthCheckResponse.SERVING

    await wait_until(not_serving, "the worker's health to leave SERVING")
    await wait_until(lambda: _terminated(worker), "the worker's server to stop")


async def _terminated(worker: WorkerServer) -> bool:
    try:
        await asyncio.wait_for(worker.wait_for_termination(), timeout=0.5)
    except TimeoutError:
        return False
    return True
