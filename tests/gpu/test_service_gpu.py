"""The service on a GPU: a router and one GPU worker serving the Qwen3-30B-A3B shapes (random bf16 weights, decode
steps as CUDA graphs), streamed through the SDK, with the bad-input behaviour of the CPU service.

One scenario runs once (building 30B parameters takes a while) and each test checks one part of it. Skips without
CUDA. On the GPU machine this needs the gRPC stack: carry .gpu (with service.tar.xz from scripts/pack_device_site.py),
nanocp/v1 and nanocp/internal, and run python3 -m pytest --noconftest -q tests/gpu.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import pytest
import torch

from nanocp.client import AsyncClient
from nanocp.client.errors import NanocpError
from nanocp.router.server import serve_router
from nanocp.worker.engine import EngineConfig
from nanocp.worker.server import serve_worker

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

HOST = "127.0.0.1"
MODEL = "qwen3-30b-a3b"
PAGE = 16
NUM_PAGES = 2048  # 32K tokens of KV next to 61 GB of weights, less than the model's context of 40K
PROMPT_LENGTHS = (12, 200, 900, 3000, 50, 1500, 7, 400)
MAX_TOKENS = 24


@dataclass
class Scenario:
    tokens: dict[str, list[int]] = field(default_factory=dict)
    finish: dict[str, str | None] = field(default_factory=dict)
    tpot_ms: dict[str, float] = field(default_factory=dict)
    errors: dict[str, tuple[str, str]] = field(default_factory=dict)  # case -> (error class, message)
    survivor_tokens: int = 0
    cancelled_finish: str | None = None
    pages_after: list[tuple[int, int]] = field(default_factory=list)  # per instance: in use, committed
    graph_replays: int = 0


async def _stream(client: AsyncClient, prompt: list[int], max_tokens: int) -> tuple[list[int], str | None]:
    tokens: list[int] = []
    finish = None
    async for chunk in client.generate(prompt, max_tokens=max_tokens, temperature=0, ignore_eos=True):
        tokens.extend(chunk.token_ids)
        finish = chunk.finish_reason
    return tokens, finish


async def _scenario() -> Scenario:
    config = EngineConfig(
        page_size=PAGE, num_pages=NUM_PAGES, max_step_tokens=4096, max_running=64, device="cuda", dtype="bfloat16"
    )
    worker = await serve_worker(MODEL, config, HOST, 0, "gpu0")
    router = await serve_router(MODEL, [f"{HOST}:{worker.port}"], HOST, 0, heartbeat_s=0.2)
    result = Scenario()
    generator = torch.Generator().manual_seed(5)
    try:
        async with AsyncClient(f"{HOST}:{router.port}") as client:
            prompts = {f"p{n}": torch.randint(0, 151936, (n,), generator=generator).tolist() for n in PROMPT_LENGTHS}

            async def timed(name: str, prompt: list[int]) -> None:
                start = time.perf_counter()
                result.tokens[name], result.finish[name] = await _stream(client, prompt, MAX_TOKENS)
                result.tpot_ms[name] = 1e3 * (time.perf_counter() - start) / MAX_TOKENS

            await asyncio.gather(*(timed(name, prompt) for name, prompt in prompts.items()))

            bad = {
                "empty prompt": ([], 8),
                "token beyond the vocabulary": ([151936], 8),
                "max_tokens beyond the context": ([1, 2, 3], 10**7),
                "prompt beyond the KV pool": (list(range(NUM_PAGES * PAGE + 1)), 1),  # within the context
            }
            for case, (prompt, max_tokens) in bad.items():
                try:
                    await _stream(client, prompt, max_tokens)
                except NanocpError as exc:
                    result.errors[case] = (type(exc).__name__, str(exc))

            # Cancel one stream after its first tokens while another runs on; the other must finish whole.
            survivor = asyncio.create_task(_stream(client, prompts["p900"], 64))
            stream = client.generate(prompts["p200"], max_tokens=200, temperature=0, ignore_eos=True)
            async for chunk in stream:
                if chunk.token_ids:
                    break
            await client.abort(stream.request_id)
            async for chunk in stream:
                result.cancelled_finish = chunk.finish_reason
            tokens, _ = await survivor
            result.survivor_tokens = len(tokens)

            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                statuses = (await client.list_instances()).instances
                result.pages_after = [(s.kv_pages_in_use, s.kv_pages_committed) for s in statuses]
                if all(p == (0, 0) for p in result.pages_after):
                    break
                await asyncio.sleep(0.1)
        graphs = worker.engine.runner.graphs
        result.graph_replays = graphs.replays if graphs is not None else 0
    finally:
        await router.stop()
        await worker.stop()
    return result


@pytest.fixture(scope="module")
def scenario() -> Scenario:
    return asyncio.run(_scenario())


def test_streams_complete_with_graphed_decode(scenario: Scenario) -> None:
    assert set(scenario.tokens) == {f"p{n}" for n in PROMPT_LENGTHS}
    assert all(len(t) == MAX_TOKENS for t in scenario.tokens.values())
    assert set(scenario.finish.values()) == {"length"}
    assert scenario.graph_replays > 0
    print({name: round(ms, 1) for name, ms in scenario.tpot_ms.items()})


def test_bad_input_gets_a_clear_status(scenario: Scenario) -> None:
    codes = {case: name for case, (name, _) in scenario.errors.items()}
    assert codes == {
        "empty prompt": "InvalidArgument",
        "token beyond the vocabulary": "InvalidArgument",
        "max_tokens beyond the context": "InvalidArgument",
        "prompt beyond the KV pool": "ResourceExhausted",
    }, scenario.errors
    assert "max_tokens" in scenario.errors["max_tokens beyond the context"][1]


def test_cancel_frees_pages_and_spares_the_others(scenario: Scenario) -> None:
    assert scenario.cancelled_finish == "abort"
    assert scenario.survivor_tokens == 64
    assert scenario.pages_after and all(p == (0, 0) for p in scenario.pages_after)
