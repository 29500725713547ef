"""Failures of the HTTP API in OpenAI's error shape with the status a client acts on (400, 404, 429, 503), the same
bad-input table and messages as the gRPC face, a client that goes away freeing its KV pages, and the caller's W3C
trace context carried from HTTP headers into the router's span."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest
from conftest import Cluster, StartCluster, wait_until
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from starlette.requests import ClientDisconnect
from test_router_validation import BAD_REQUESTS

from nanocp import telemetry
from nanocp.router.server import serve_router

BIG = {"max_tokens": 990, "ignore_eos": True}  # 63 of the worker's 64 pages, for seconds (test_router_admission)


@pytest.fixture
async def http_cluster(start_cluster: StartCluster) -> Cluster:
    return await start_cluster(http=True, queue_size=1)


@pytest.fixture
async def client(http_cluster: Cluster) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=f"{http_cluster.http_url}/v1", api_key="unused", max_retries=0) as c:
        yield c


def message(exc: openai.APIStatusError) -> str:
    assert isinstance(exc.body, dict)
    return str(exc.body["message"])


def _json_can_say(params: dict[str, Any]) -> bool:
    """Whether standard JSON can carry the values (no NaN or infinity: the openai client refuses to send them)."""
    return all(not isinstance(v, float) or math.isfinite(v) for v in params.values())


@pytest.mark.parametrize(
    ("prompt", "params", "field"),
    [p for p in BAD_REQUESTS if _json_can_say(p.values[1])],  # type: ignore[arg-type]
)
async def test_bad_request_is_400_with_the_grpc_message(
    client: openai.AsyncOpenAI, prompt: str | list[int], params: dict[str, Any], field: str
) -> None:
    standard = {k: v for k, v in params.items() if k in ("max_tokens", "temperature", "top_p")}
    extensions = {k: v for k, v in params.items() if k not in standard}
    with pytest.raises(openai.BadRequestError) as caught:
        await client.completions.create(model="tiny", prompt=prompt, **standard, extra_body=extensions)
    assert field in message(caught.value)
    assert caught.value.code == "invalid_argument" and caught.value.type == "invalid_request_error"


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
async def test_non_finite_sampling_values_are_400(http_cluster: Cluster, value: str) -> None:
    """What a client that is not the openai package may send: Python's json reads these tokens as floats."""
    body = f'{{"model": "tiny", "prompt": [1], "temperature": {value}}}'
    async with httpx.AsyncClient(base_url=http_cluster.http_url) as http:
        answer = await http.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    assert answer.status_code == 400, answer.text
    assert "temperature" in answer.json()["error"]["message"]


@pytest.mark.parametrize(
    ("params", "words"),
    [
        pytest.param({"logprobs": 2}, "logprobs: nanocp does not return log probabilities", id="logprobs"),
        pytest.param({"n": 0}, "n must be at least 1", id="zero_n"),
        pytest.param({"n": 65}, "at most 64", id="too_many_choices"),
        pytest.param({"best_of": 3}, "best_of: not supported", id="best_of"),
        pytest.param({"stop": [""]}, "stop: a stop string must not be empty", id="empty_stop"),
        pytest.param({"stop": ["x"] * 17}, "stop: at most 16 strings", id="too_many_stops"),
        pytest.param({"seed": -1}, "seed must be in", id="negative_seed"),
        pytest.param({"max_tokens": 2**40}, "max_tokens: 1099511627776 is out of range", id="beyond_int32"),
        pytest.param({"max_tokens": "many"}, "max_tokens: Input should be a valid integer", id="wrong_type"),
        pytest.param({"max_tokens": 1100}, "the request can never fit", id="never_fits"),
    ],
)
async def test_what_only_http_has_is_checked_with_a_400_naming_it(
    client: openai.AsyncOpenAI, params: dict[str, Any], words: str
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await client.completions.create(model="tiny", prompt=list(range(10)), extra_body=params)
    assert words in message(caught.value)


async def test_chat_with_a_logprobs_request_is_refused(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="logprobs"):
        await client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], logprobs=True)


async def test_unknown_model_and_path_are_404(client: openai.AsyncOpenAI, http_cluster: Cluster) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        await client.completions.create(model="gpt-4", prompt="hi")
    assert caught.value.code == "model_not_found" and "'gpt-4' does not exist" in message(caught.value)
    async with httpx.AsyncClient(base_url=http_cluster.http_url) as http:
        missing = await http.post("/v1/embeddings", json={})
    assert missing.status_code == 404 and missing.json()["error"]["message"] == "Not Found"


async def test_full_admission_queue_is_429(client: openai.AsyncOpenAI, http_cluster: Cluster) -> None:
    big = http_cluster.client.generate(list(range(10)), **BIG)  # type: ignore[arg-type]
    await anext(big)
    waiting = asyncio.create_task(client.completions.create(model="tiny", prompt=[1], max_tokens=20))
    await wait_until(lambda: queued(http_cluster, 1), "one request to queue")
    with pytest.raises(openai.RateLimitError) as caught:
        await client.completions.create(model="tiny", prompt=[1], max_tokens=20)
    assert "admission queue is full" in message(caught.value)
    big.cancel()
    assert (await waiting).choices[0].finish_reason in ("length", "stop")
    await http_cluster.wait_all_pages_free()


async def queued(cluster: Cluster, n: int) -> bool:
    return (await cluster.client.list_instances()).queued == n


async def test_no_worker_ready_is_503_and_health_says_so() -> None:
    router = await serve_router("tiny", [], "127.0.0.1", 0, http_port=0)
    try:
        base = f"http://127.0.0.1:{router.http_port}"
        async with openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0) as client:
            with pytest.raises(openai.InternalServerError) as caught:
                await client.completions.create(model="tiny", prompt="hi", max_tokens=4)
        assert caught.value.status_code == 503 and "no worker instance is ready" in message(caught.value)
        async with httpx.AsyncClient(base_url=base) as http:
            assert (await http.get("/health")).status_code == 503
    finally:
        await router.stop()


async def home_batch(cluster: Cluster) -> int:
    return sum(i.home_batch for i in (await cluster.instances()).values())


async def is_running(cluster: Cluster) -> bool:
    return await home_batch(cluster) == 1


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
async def traced_cluster(start_cluster: StartCluster, exporter: InMemorySpanExporter) -> Cluster:
    provider = TracerProvider(id_generator=telemetry.AgreedIds())  # as configure_tracing builds it
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return await start_cluster(http=True, tracer_provider=provider)


def cancelled_early(exporter: InMemorySpanExporter) -> bool:
    """The router's span of the one request says it was cancelled before its 990 tokens."""
    (span,) = [s for s in exporter.get_finished_spans() if s.name == "text_completion tiny"]
    assert span.attributes is not None
    return (
        span.attributes["error.type"] == "CANCELLED" and int(str(span.attributes["gen_ai.usage.output_tokens"])) < 990
    )


async def test_client_leaving_a_stream_aborts_it_and_frees_its_pages(
    traced_cluster: Cluster, exporter: InMemorySpanExporter
) -> None:
    body = {"model": "tiny", "prompt": [1, 2, 3], "stream": True, **BIG}
    async with (
        httpx.AsyncClient(base_url=traced_cluster.http_url, timeout=60) as http,
        http.stream("POST", "/v1/completions", json=body) as response,
    ):
        assert response.status_code == 200
        lines = response.aiter_lines()  # kept: an abandoned iterator would close the stream when collected
        assert (await anext(lines)).startswith("data: {")
        assert await is_running(traced_cluster)
    await traced_cluster.wait_all_pages_free()
    assert cancelled_early(exporter)


async def test_client_leaving_a_whole_answer_aborts_it_and_frees_its_pages(
    traced_cluster: Cluster, exporter: InMemorySpanExporter
) -> None:
    body = {"model": "tiny", "prompt": [1, 2, 3], **BIG}
    async with httpx.AsyncClient(base_url=traced_cluster.http_url, timeout=60) as http:
        request = asyncio.create_task(http.post("/v1/completions", json=body))
        await wait_until(lambda: is_running(traced_cluster), "the request to run")
        request.cancel()
    await traced_cluster.wait_all_pages_free()
    assert cancelled_early(exporter)


async def test_client_leaving_before_the_first_stream_chunk_aborts_it_and_frees_its_pages(
    traced_cluster: Cluster, exporter: InMemorySpanExporter
) -> None:
    """The window between the status line's decision (every choice's first event in) and the body's first chunk,
    driven through ASGI as a server of ASGI spec 2.4 runs it: the connection is reset as the status line goes out,
    so the body's generator never starts."""
    app = traced_cluster.router.http_app
    assert app is not None
    body = json.dumps({"model": "tiny", "prompt": [1, 2, 3], "stream": True, **BIG}).encode()
    heard = 0

    async def receive() -> dict[str, Any]:
        nonlocal heard
        heard += 1
        if heard == 1:
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # the handler's watch while the first events come: the client is still there
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        raise OSError("connection reset by peer")

    headers = [(b"content-type", b"application/json"), (b"host", b"test")]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/completions",
        "raw_path": b"/v1/completions",
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 1),
        "server": None,
    }
    with pytest.raises(ClientDisconnect):
        await app(scope, receive, send)
    await traced_cluster.wait_all_pages_free()
    assert cancelled_early(exporter)


async def test_a_stop_string_ends_the_request_as_finished_on_its_span_and_frees_its_pages(
    traced_cluster: Cluster, exporter: InMemorySpanExporter
) -> None:
    params: dict[str, Any] = {"model": "tiny", "prompt": "Stop here", "max_tokens": 40, "temperature": 0}
    params["extra_body"] = {"ignore_eos": True}
    url = f"{traced_cluster.http_url}/v1"
    async with openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0) as client:
        text = (await client.completions.create(**params)).choices[0].text
        stop = next(text[i : i + 2] for i in range(4, len(text) - 2) if "\ufffd" not in text[i : i + 2])
        stopped = await client.completions.create(**params, stop=[stop])
    assert stopped.choices[0].finish_reason == "stop"
    await traced_cluster.wait_all_pages_free()
    whole, cut = [s for s in exporter.get_finished_spans() if s.name == "text_completion tiny"]
    assert cut.attributes is not None and cut.attributes["gen_ai.response.finish_reasons"] == ("stop",)
    assert cut.status.is_ok and "error.type" not in cut.attributes, "a stop string is a finish, not a cancellation"
    assert whole.attributes is not None and whole.attributes["gen_ai.response.finish_reasons"] == ("length",)


async def test_traceparent_header_makes_the_router_span_a_child_of_the_caller(
    traced_cluster: Cluster, exporter: InMemorySpanExporter
) -> None:
    cluster = traced_cluster
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    headers = {"traceparent": f"00-{trace_id}-{parent_id}-01"}
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    async with httpx.AsyncClient(base_url=cluster.http_url, timeout=60) as http:
        assert (await http.post("/v1/chat/completions", json=body, headers=headers)).status_code == 200
    (router,) = [s for s in exporter.get_finished_spans() if s.name == "chat tiny"]
    assert format(router.context.trace_id, "032x") == trace_id
    assert router.parent is not None and format(router.parent.span_id, "016x") == parent_id
    assert router.attributes is not None and router.attributes["gen_ai.operation.name"] == "chat"


async def test_failure_after_the_stream_began_is_an_error_event_then_done(http_cluster: Cluster) -> None:
    body = {"model": "tiny", "prompt": [1, 2, 3], "stream": True, **BIG}
    async with (
        httpx.AsyncClient(base_url=http_cluster.http_url, timeout=60) as http,
        http.stream("POST", "/v1/completions", json=body) as response,
    ):
        lines = response.aiter_lines()
        assert (await anext(lines)).startswith("data: {")
        await http_cluster.kill_worker("w0")  # the only one: nowhere else to go
        events = [line async for line in lines if line]
    error = json.loads(events[-2].removeprefix("data: "))["error"]
    assert events[-1] == "data: [DONE]"
    assert error["code"] == "unavailable" and "instance" in error["message"]
