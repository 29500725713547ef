"""With --reserve-output-tokens a request is placed for part of its output, but one that could never fit whole is
refused at once (README's promise), rather than streaming until its placement cannot grow."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from conftest import HOST

from nanocp.client import AsyncClient, ResourceExhausted
from nanocp.router.server import serve_router
from nanocp.worker.engine import EngineConfig
from nanocp.worker.server import serve_worker


@pytest.fixture
async def client() -> AsyncIterator[AsyncClient]:
    config = EngineConfig(page_size=16, num_pages=64, max_step_tokens=64, max_running=8)  # 1024 tokens of KV
    worker = await serve_worker("tiny", config, HOST, 0, "w0")
    router = await serve_router("tiny", [f"{HOST}:{worker.port}"], HOST, 0, reserve_output_tokens=32)
    async with AsyncClient(f"{HOST}:{router.port}", max_retries=0) as client:
        yield client
    await router.stop()
    await worker.stop()


async def test_a_request_that_never_fits_whole_is_refused_at_once(client: AsyncClient) -> None:
    streamed = []
    with pytest.raises(ResourceExhausted, match=r"can never fit: its KV cache needs 2099 tokens"):
        async for chunk in client.generate([1] * 100, max_tokens=2000, temperature=0.0, ignore_eos=True):
            streamed.append(chunk)
    assert streamed == [], "refused before any token"
    chunks = [c async for c in client.generate([1] * 100, max_tokens=200, temperature=0.0, ignore_eos=True)]
    assert sum(len(c.token_ids) for c in chunks) == 200, "one that fits whole still grows from its reservation"
