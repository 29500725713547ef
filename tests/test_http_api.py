"""The router's OpenAI-compatible HTTP API, with the official `openai` client as the caller, against a real router
and CPU worker: completions and chat, whole and streamed, usage, seeds, stop strings, n, and the wire format of SSE."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import openai
import pytest
from conftest import Cluster, StartCluster, write_model_config

from nanocp.model_config import load_model_config
from nanocp.router.http.chat_template import BUILT_IN, ChatTemplate
from nanocp.router.http.choices import StopStrings
from nanocp.router.http.schema import ChatMessage
from nanocp.router.server import serve_router

LONG = {"ignore_eos": True}  # random weights may sample EOS early: these tests want the length they ask for


@pytest.fixture
async def http_cluster(start_cluster: StartCluster) -> Cluster:
    return await start_cluster(http=True)


@pytest.fixture
async def client(http_cluster: Cluster) -> AsyncIterator[openai.AsyncOpenAI]:
    # No retries: a test must see the first answer, 429 and 503 included.
    async with openai.AsyncOpenAI(base_url=f"{http_cluster.http_url}/v1", api_key="unused", max_retries=0) as c:
        yield c


async def test_completion_returns_text_finish_reason_and_usage(client: openai.AsyncOpenAI) -> None:
    prompt = [5, 6, 7, 8]
    out = await client.completions.create(model="tiny", prompt=prompt, max_tokens=12, extra_body=LONG)
    (choice,) = out.choices
    assert out.object == "text_completion" and out.model == "tiny" and out.id.startswith("cmpl-")
    assert choice.finish_reason == "length" and choice.index == 0
    assert out.usage is not None
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (4, 12, 16)


async def test_greedy_text_over_http_equals_the_grpc_stream(client: openai.AsyncOpenAI, http_cluster: Cluster) -> None:
    grpc_text = "".join(
        [c.text async for c in http_cluster.client.generate("Hello", max_tokens=24, temperature=0, ignore_eos=True)]
    )
    out = await client.completions.create(model="tiny", prompt="Hello", max_tokens=24, temperature=0, extra_body=LONG)
    assert out.choices[0].text == grpc_text


async def test_streamed_completion_joins_to_the_whole_one_and_ends_with_usage(client: openai.AsyncOpenAI) -> None:
    params = {"model": "tiny", "prompt": "Hi there", "max_tokens": 20, "temperature": 0, "extra_body": LONG}
    whole = await client.completions.create(**params)  # type: ignore[call-overload]
    stream = await client.completions.create(**params, stream=True, stream_options={"include_usage": True})
    chunks = [chunk async for chunk in stream]
    *text_chunks, usage_chunk = chunks
    assert "".join(c.choices[0].text for c in text_chunks) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in text_chunks][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    assert usage_chunk.choices == [] and usage_chunk.usage is not None
    assert usage_chunk.usage.completion_tokens == 20 and usage_chunk.usage.prompt_tokens == len(b"Hi there")


async def test_chat_uses_the_template_and_streams_role_then_content(client: openai.AsyncOpenAI) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    params = {"model": "tiny", "messages": messages, "max_completion_tokens": 10, "temperature": 0, "extra_body": LONG}
    whole = await client.chat.completions.create(**params)  # type: ignore[call-overload]
    assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
    prompt = ChatTemplate(BUILT_IN, {}).render([ChatMessage.model_validate(m) for m in messages])
    assert whole.usage is not None and whole.usage.prompt_tokens == len(prompt.encode())
    assert whole.usage.completion_tokens == 10
    stream = await client.chat.completions.create(**params, stream=True)
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"


@pytest.mark.parametrize(
    ("pieces", "emitted", "stopped"),
    [
        pytest.param(["ab", "c"], ["ab", "c"], False, id="no_stop_string"),
        pytest.param(["abE", "ND", "x"], ["ab", ""], True, id="held_back_then_matched"),
        pytest.param(["xE", "Y"], ["x", "EY"], False, id="held_back_then_released"),
        pytest.param(["a##b"], ["a"], True, id="the_earliest_of_two"),
    ],
)
def test_stop_strings_hold_back_what_may_start_one(pieces: list[str], emitted: list[str], stopped: bool) -> None:
    strings = StopStrings(["END", "##"])
    results = [strings.push(piece) for piece in pieces[: len(emitted)]]
    assert [text for text, _ in results] == emitted
    assert results[-1][1] is stopped


def test_built_in_template_renders_role_tagged_turns_and_opens_the_reply() -> None:
    messages = [ChatMessage(role="user", content=[{"type": "text", "text": "a"}, {"type": "text", "text": "b"}])]
    assert ChatTemplate(BUILT_IN, {}).render(messages) == "<|user|>\nab\n<|assistant|>\n"


async def test_same_seed_replays_and_another_seed_differs(client: openai.AsyncOpenAI) -> None:
    async def sample(seed: int) -> str:
        out = await client.completions.create(model="tiny", prompt=[1, 2, 3], max_tokens=24, seed=seed, extra_body=LONG)
        return out.choices[0].text

    first = await sample(7)
    assert await sample(7) == first
    assert await sample(8) != first  # 24 tokens over 384 at temperature 1: equal only by a 1e-60 chance


async def test_stop_string_cuts_the_text_before_it_and_frees_the_pages(
    client: openai.AsyncOpenAI, http_cluster: Cluster
) -> None:
    params = {"model": "tiny", "prompt": "Stop here", "max_tokens": 40, "temperature": 0, "extra_body": LONG}
    text = (await client.completions.create(**params)).choices[0].text  # type: ignore[call-overload]
    stop = next(text[i : i + 2] for i in range(4, len(text) - 2) if "\ufffd" not in text[i : i + 2])
    for stream in (False, True):
        out = await client.completions.create(**params, stop=[stop, "never in it"], stream=stream)
        if stream:
            chunks = [c async for c in out]
            cut, reason = "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
        else:
            cut, reason = out.choices[0].text, out.choices[0].finish_reason
        assert (cut, reason) == (text[: text.index(stop)], "stop")
    await http_cluster.wait_all_pages_free()


async def test_n_choices_are_sampled_apart_and_usage_counts_the_prompt_once(client: openai.AsyncOpenAI) -> None:
    out = await client.completions.create(model="tiny", prompt=[1, 2, 3], max_tokens=16, n=2, seed=3, extra_body=LONG)
    assert [c.index for c in out.choices] == [0, 1]
    assert out.choices[0].text != out.choices[1].text
    assert out.usage is not None and (out.usage.prompt_tokens, out.usage.completion_tokens) == (3, 32)


async def test_a_list_of_prompts_gets_a_choice_each(client: openai.AsyncOpenAI) -> None:
    out = await client.completions.create(model="tiny", prompt=["ab", "cde"], max_tokens=4, extra_body=LONG)
    assert len(out.choices) == 2
    assert out.usage is not None and out.usage.prompt_tokens == 5


async def test_models_and_health(client: openai.AsyncOpenAI, http_cluster: Cluster) -> None:
    assert [m.id for m in (await client.models.list()).data] == ["tiny"]
    async with httpx.AsyncClient(base_url=http_cluster.http_url) as http:
        health = await http.get("/health")
        metrics = (await http.get("/metrics")).text
    assert health.status_code == 200 and health.json() == {"ready_instances": 1}
    assert 'vllm:num_requests_waiting{model_name="tiny"} 0.0' in metrics
    assert 'vllm:kv_cache_usage_perc{model_name="tiny"} 0.0' in metrics


async def test_sse_wire_format_is_data_events_ending_in_done(http_cluster: Cluster) -> None:
    body = {"model": "tiny", "prompt": "abc", "max_tokens": 6, "stream": True, "ignore_eos": True}
    async with (
        httpx.AsyncClient(base_url=http_cluster.http_url, timeout=60) as http,
        http.stream("POST", "/v1/completions", json=body) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = (await response.aread()).decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: {") and "\n" not in e for e in events[:-2])
    assert {p["object"] for p in payloads} == {"text_completion"}
    assert payloads[-1]["choices"][0]["finish_reason"] == "length"
    assert "usage" not in payloads[0]  # only with stream_options.include_usage


QWEN_STYLE = (
    "{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_a_checkpoint_template_comes_from_tokenizer_config_with_its_special_tokens(tmp_path: Path) -> None:
    write_model_config(tmp_path)
    config = {"chat_template": QWEN_STYLE + "{{ bos_token }}", "bos_token": {"content": "<s>"}, "eos_token": "</s>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    template = ChatTemplate.load(load_model_config(str(tmp_path)))
    assert template is not None
    rendered = template.render([ChatMessage(role="user", content="Hi")])
    assert rendered == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<s>"


async def test_chat_on_a_checkpoint_without_a_template_is_400_pointing_to_completions(tmp_path: Path) -> None:
    write_model_config(tmp_path)
    router = await serve_router(str(tmp_path), [], "127.0.0.1", 0, http_port=0)
    try:
        base = f"http://127.0.0.1:{router.http_port}/v1"
        async with openai.AsyncOpenAI(base_url=base, api_key="unused", max_retries=0) as client:
            with pytest.raises(openai.BadRequestError, match=r"no chat template .*use /v1/completions"):
                await client.chat.completions.create(model=tmp_path.name, messages=[{"role": "user", "content": "x"}])
    finally:
        await router.stop()
