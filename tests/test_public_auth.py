"""The public API with tokens on: calls without a valid token are UNAUTHENTICATED; a client sees and aborts only the
requests its token created, an admin token all; request ids have a length limit; the router serves TLS."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from conftest import HOST, StartCluster
from test_internal_auth import make_certificates

from nanocp.auth import BearerAuth, TokenFile
from nanocp.cli import main
from nanocp.client import AsyncClient, InvalidArgument, NotFound, Unauthenticated, Unavailable
from nanocp.limits import MAX_REQUEST_ID_CHARS
from nanocp.router.server import RouterServer, serve_router
from nanocp.tls import ServerTls
from nanocp.worker.engine import EngineConfig
from nanocp.worker.server import WorkerServer, serve_worker

CONFIG = EngineConfig(page_size=16, num_pages=256, max_step_tokens=64, max_running=8)
LONG = 3000  # new tokens: a stream that outlives the test's checks; every test aborts it


@pytest.fixture
async def worker() -> AsyncIterator[WorkerServer]:
    server = await serve_worker("tiny", CONFIG, HOST, 0, "w0")
    yield server
    await server.stop()


@pytest.fixture
async def router(worker: WorkerServer, tmp_path: Path) -> AsyncIterator[RouterServer]:
    (tmp_path / "tokens").write_text("alice-token\nbob-token\n")
    (tmp_path / "admin").write_text("admin-token\n")
    auth = BearerAuth(TokenFile(tmp_path / "tokens"), TokenFile(tmp_path / "admin"))
    server = await serve_router("tiny", [f"{HOST}:{worker.port}"], HOST, 0, auth=auth)
    yield server
    await server.stop()


def client(router: RouterServer, token: str | None) -> AsyncClient:
    return AsyncClient(f"{HOST}:{router.port}", token=token, max_retries=0)


async def test_calls_without_a_valid_token_are_unauthenticated(router: RouterServer) -> None:
    for token in (None, "mallory-token", ""):
        async with client(router, token) as anonymous:
            with pytest.raises(Unauthenticated, match="Bearer"):
                async for _ in anonymous.generate([1, 2, 3], max_tokens=2):
                    pass
            with pytest.raises(Unauthenticated):
                await anonymous.list_instances()
            with pytest.raises(Unauthenticated):
                await anonymous.abort("anything")


async def test_a_client_sees_and_aborts_only_its_own_requests(router: RouterServer) -> None:
    alice, bob, admin = (client(router, f"{name}-token") for name in ("alice", "bob", "admin"))
    async with alice, bob, admin:
        stream = alice.generate([1, 2, 3], max_tokens=LONG, ignore_eos=True, request_id="alice-1")
        await anext(stream)
        assert [r.request_id for r in (await alice.list_instances()).requests] == ["alice-1"]
        assert [r.request_id for r in (await admin.list_instances()).requests] == ["alice-1"]
        listing = await bob.list_instances()
        assert listing.requests == [] and [i.id for i in listing.instances] == ["w0"]
        with pytest.raises(NotFound):
            await bob.abort("alice-1")
        await alice.abort("alice-1")
        assert [c.finish_reason async for c in stream][-1] == "abort"

        stream = bob.generate([1, 2, 3], max_tokens=LONG, ignore_eos=True, request_id="bob-1")
        await anext(stream)
        await admin.abort("bob-1")  # an admin may abort any request
        assert [c.finish_reason async for c in stream][-1] == "abort"


async def test_without_tokens_every_caller_sees_and_aborts_every_request(start_cluster: StartCluster) -> None:
    cluster = await start_cluster(num_pages=256)
    stream = cluster.client.generate([1, 2, 3], max_tokens=LONG, ignore_eos=True, request_id="r1")
    await anext(stream)
    async with AsyncClient(cluster.address) as other:
        assert [r.request_id for r in (await other.list_instances()).requests] == ["r1"]
        await other.abort("r1")
    assert [c.finish_reason async for c in stream][-1] == "abort"


@pytest.mark.parametrize("length", [MAX_REQUEST_ID_CHARS + 1, 2_200_000])
async def test_request_ids_over_the_limit_are_invalid(start_cluster: StartCluster, length: int) -> None:
    cluster = await start_cluster()
    with pytest.raises(InvalidArgument, match=f"limit is {MAX_REQUEST_ID_CHARS}"):
        async for _ in cluster.client.generate([1, 2, 3], max_tokens=2, request_id="x" * length):
            pass
    with pytest.raises(InvalidArgument):
        await cluster.client.abort("x" * length)
    at_limit = [
        c
        async for c in cluster.client.generate(
            [1, 2], max_tokens=2, ignore_eos=True, request_id="y" * MAX_REQUEST_ID_CHARS
        )
    ]
    assert at_limit[-1].finish_reason == "length"


async def test_the_router_serves_tls_to_clients_that_trust_its_ca(worker: WorkerServer, tmp_path: Path) -> None:
    certs = make_certificates(tmp_path)
    tls = ServerTls(certs["worker_crt"], certs["worker_key"])  # any server certificate of the CA will do
    router = await serve_router("tiny", [f"{HOST}:{worker.port}"], HOST, 0, tls=tls)
    try:
        target = f"{HOST}:{router.port}"
        async with AsyncClient(target, ca_file=certs["ca_crt"], max_retries=0) as trusted:
            chunks = [c async for c in trusted.generate([1, 2], max_tokens=2, ignore_eos=True)]
            assert chunks[-1].finish_reason == "length"
        renamed = f"localhost:{router.port}"  # as through a port-forward: the certificate holds another name
        async with AsyncClient(renamed, ca_file=certs["ca_crt"], server_name="nanocp-worker") as trusted:
            chunks = [c async for c in trusted.generate([1, 2], max_tokens=2, ignore_eos=True)]
            assert chunks[-1].finish_reason == "length"
        async with AsyncClient(target, max_retries=0) as plaintext:
            with pytest.raises(Unavailable):
                await plaintext.list_instances(timeout=30)
    finally:
        await router.stop()


async def test_the_cli_sends_its_token(
    router: RouterServer, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NANOCP_TOKEN", raising=False)
    command = ["generate", "--router", f"{HOST}:{router.port}", "--token-ids", "1,2", "--max-tokens", "2", "--ids"]
    await asyncio.to_thread(main, [*command, "--token", "bob-token"])
    assert "[length:" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="UNAUTHENTICATED"):
        await asyncio.to_thread(main, command)


async def test_the_http_api_takes_the_same_tokens(worker: WorkerServer, tmp_path: Path) -> None:
    (tmp_path / "tokens").write_text("alice-token\n")
    auth = BearerAuth(TokenFile(tmp_path / "tokens"))
    router = await serve_router("tiny", [f"{HOST}:{worker.port}"], HOST, 0, auth=auth, http_port=0)
    body = {"model": "tiny", "prompt": [1, 2], "max_tokens": 2}
    try:
        async with httpx.AsyncClient(base_url=f"http://{HOST}:{router.http_port}", timeout=60) as http:
            for headers in ({}, {"Authorization": "Bearer mallory-token"}):
                refused = await http.post("/v1/completions", json=body, headers=headers)
                assert refused.status_code == 401, refused.text
                assert "Bearer" in refused.json()["error"]["message"]
                assert (await http.get("/v1/models", headers=headers)).status_code == 401
            served = await http.post("/v1/completions", json=body, headers={"Authorization": "Bearer alice-token"})
            assert served.status_code == 200 and served.json()["usage"]["completion_tokens"] == 2
            assert (await http.get("/health")).status_code == 200  # probes need no token
    finally:
        await router.stop()
