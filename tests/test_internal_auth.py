"""The workers' internal API takes calls only from who holds the internal token (or, with mutual TLS, a certificate
the client CA signed): refused UNAUTHENTICATED otherwise, health checks excepted; a rotated token file takes effect
at the next call; a router given the token serves through such workers."""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from conftest import HOST
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nanocp.auth import BearerAuth, TokenFile, bearer_token
from nanocp.client import AsyncClient
from nanocp.internal.v1 import worker_pb2, worker_pb2_grpc
from nanocp.router.server import serve_router
from nanocp.tls import ChannelTls, ServerTls, aio_channel
from nanocp.top import Top
from nanocp.v1 import common_pb2
from nanocp.worker.engine import EngineConfig
from nanocp.worker.server import WorkerServer, serve_worker

CONFIG = EngineConfig(page_size=16, num_pages=32, max_step_tokens=64, max_running=8)
TOKEN = "internal-secret-token"


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text(f"# the internal token\n{TOKEN}\n")
    return path


@pytest.fixture
async def worker(token_file: Path) -> AsyncIterator[WorkerServer]:
    server = await serve_worker("tiny", CONFIG, HOST, 0, "w0", auth=BearerAuth(TokenFile(token_file)))
    yield server
    await server.stop()


def stub_of(channel: grpc.aio.Channel) -> worker_pb2_grpc.WorkerServiceAsyncStub:
    return worker_pb2_grpc.WorkerServiceStub(channel)  # type: ignore[return-value]


async def code_of(call: object) -> grpc.StatusCode:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def test_internal_calls_without_the_token_are_unauthenticated(worker: WorkerServer) -> None:
    submit = worker_pb2.SubmitRequest(
        request_id="r", prompt_token_ids=[1, 2, 3], sampling=common_pb2.SamplingParams(max_tokens=4)
    )
    for interceptors in ([], bearer_token("wrong-token")):
        async with aio_channel(f"{HOST}:{worker.port}", None, interceptors) as channel:
            stub = stub_of(channel)
            assert await code_of(stub.GetInfo(worker_pb2.GetInfoRequest())) == grpc.StatusCode.UNAUTHENTICATED
            assert await code_of(stub.Abort(worker_pb2.AbortRequest(request_id="r"))) == grpc.StatusCode.UNAUTHENTICATED
            extend = worker_pb2.ExtendRequest(request_id="r")
            assert await code_of(stub.Extend(extend)) == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                async for _ in stub.Submit(submit):
                    pass
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "Bearer" in (refused.value.details() or "")
            # kubelet's probes send no metadata: health stays open
            health = health_pb2_grpc.HealthStub(channel)
            answer = await health.Check(health_pb2.HealthCheckRequest(service=""))
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
    assert worker.engine.load_snapshot.running == 0  # nothing reached the engine


async def test_internal_calls_with_the_token_are_served(worker: WorkerServer) -> None:
    async with aio_channel(f"{HOST}:{worker.port}", None, bearer_token(TOKEN)) as channel:
        stub = stub_of(channel)
        assert (await stub.GetInfo(worker_pb2.GetInfoRequest())).instance_id == "w0"
        submit = worker_pb2.SubmitRequest(
            request_id="r", prompt_token_ids=[1, 2, 3], sampling=common_pb2.SamplingParams(max_tokens=4)
        )
        replies = [r async for r in stub.Submit(submit)]
        assert sum(len(r.token_ids) for r in replies) == 4


async def test_a_rotated_token_file_takes_effect_at_the_next_call(worker: WorkerServer, token_file: Path) -> None:
    token_file.write_text("rotated-token-with-another-length\n")
    async with aio_channel(f"{HOST}:{worker.port}", None, bearer_token(TOKEN)) as old:
        assert await code_of(stub_of(old).GetLoad(worker_pb2.GetLoadRequest())) == grpc.StatusCode.UNAUTHENTICATED
    sender = bearer_token(TokenFile(token_file))  # the router's side reads the file again too
    async with aio_channel(f"{HOST}:{worker.port}", None, sender) as new:
        assert await code_of(stub_of(new).GetLoad(worker_pb2.GetLoadRequest())) == grpc.StatusCode.OK


async def test_a_router_with_the_internal_token_serves_through_the_worker(
    worker: WorkerServer, token_file: Path
) -> None:
    router = await serve_router("tiny", [f"{HOST}:{worker.port}"], HOST, 0, internal_token=TokenFile(token_file))
    try:
        async with AsyncClient(f"{HOST}:{router.port}") as client:
            chunks = [c async for c in client.generate([1, 2, 3], max_tokens=3, ignore_eos=True)]
            assert chunks[-1].finish_reason == "length"
    finally:
        await router.stop()


def make_certificates(directory: Path) -> dict[str, Path]:
    """A CA, a worker certificate for the name nanocp-worker (and the loopback address), a router client certificate,
    and a client certificate of another CA, by openssl."""

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True, timeout=60)

    for ca in ("ca", "other-ca"):
        run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{ca}.key", "-out", f"{ca}.crt", "-days", "1",
            "-subj", f"/CN=nanocp-{ca}")  # fmt: skip
    for name, usage in (("worker", "serverAuth"), ("router", "clientAuth"), ("stranger", "clientAuth")):
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN=nanocp-{name}")  # fmt: skip
        san = f"DNS:nanocp-{name},IP:{HOST}"
        (directory / f"{name}.ext").write_text(f"subjectAltName={san}\nextendedKeyUsage={usage}\n")
        ca = "other-ca" if name == "stranger" else "ca"
        run("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key", "-CAcreateserial",
            "-out", f"{name}.crt", "-days", "1", "-extfile", f"{name}.ext")  # fmt: skip
    return {p.stem + p.suffix.replace(".", "_"): p for p in directory.iterdir()}


async def test_mutual_tls_admits_only_certificates_of_the_client_ca(tmp_path: Path) -> None:
    certs = make_certificates(tmp_path)
    tls = ServerTls(certs["worker_crt"], certs["worker_key"], client_ca=certs["ca_crt"])
    worker = await serve_worker("tiny", CONFIG, HOST, 0, "w0", tls=tls)
    try:
        address = f"{HOST}:{worker.port}"
        router_side = ChannelTls(certs["ca_crt"], certs["router_crt"], certs["router_key"], "nanocp-worker")
        async with aio_channel(address, router_side) as channel:
            assert (await stub_of(channel).GetInfo(worker_pb2.GetInfoRequest(), timeout=30)).instance_id == "w0"
        for other in (
            ChannelTls(certs["ca_crt"], server_name="nanocp-worker"),  # no client certificate
            ChannelTls(certs["ca_crt"], certs["stranger_crt"], certs["stranger_key"], "nanocp-worker"),
            None,  # plaintext
        ):
            async with aio_channel(address, other) as channel:
                code = await code_of(stub_of(channel).GetInfo(worker_pb2.GetInfoRequest(), timeout=30))
                assert code == grpc.StatusCode.UNAVAILABLE, other  # the handshake fails: no call is made
    finally:
        await worker.stop()


async def test_top_reads_the_workers_steps_with_the_internal_token(worker: WorkerServer, token_file: Path) -> None:
    router = await serve_router("tiny", [f"{HOST}:{worker.port}"], HOST, 0, internal_token=TokenFile(token_file))
    try:
        async with AsyncClient(f"{HOST}:{router.port}") as client:
            chunks = [c async for c in client.generate([1, 2, 3], max_tokens=3, ignore_eos=True)]
            assert chunks[-1].finish_reason == "length"
        without, with_token = Top(f"{HOST}:{router.port}"), Top(f"{HOST}:{router.port}", internal_token=TOKEN)
        try:
            await without.poll()
            await with_token.poll()
            assert not without.steps.get("w0"), "GetSteps without the token is refused"
            assert with_token.steps["w0"], "the steps of the request above"
        finally:
            await without.close()
            await with_token.close()
    finally:
        await router.stop()
