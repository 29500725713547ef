"""Bad Generate requests are refused before they cost anything, with a status and a message naming the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import Cluster, write_model_config

from nanocp.client import AlreadyExists, AsyncClient, InvalidArgument
from nanocp.model_config import PRESETS
from nanocp.router.errors import InvalidRequest
from nanocp.router.server import serve_router
from nanocp.router.validation import validate
from nanocp.tokenizer import ByteTokenizer
from nanocp.v1 import common_pb2, router_pb2, router_pb2_grpc

TINY = PRESETS["tiny"]  # vocab 384, context 4096


# Bad inputs and the words their message must hold: the HTTP API is checked against the same table
# (tests/test_http_errors.py), since both faces run the one validation.
BAD_REQUESTS = [
    pytest.param("", {}, "prompt is empty", id="empty_text"),
    pytest.param([], {}, "prompt is empty", id="empty_token_ids"),
    pytest.param([1, 384], {}, "token_ids[1] = 384", id="token_id_at_vocab_size"),
    pytest.param([-1], {}, "token_ids[0] = -1", id="negative_token_id"),
    pytest.param([1] * 4096, {}, "prompt: 4096 tokens", id="prompt_fills_the_context"),
    pytest.param([1] * 5000, {}, "prompt: 5000 tokens", id="prompt_beyond_the_context"),
    pytest.param([1], {"max_tokens": 0}, "sampling.max_tokens must be at least 1", id="zero_max_tokens"),
    pytest.param([1], {"max_tokens": -5}, "sampling.max_tokens must be at least 1", id="negative_max_tokens"),
    pytest.param([1] * 100, {"max_tokens": 4000}, "sampling.max_tokens: prompt (100)", id="beyond_context"),
    pytest.param(
        [1], {"temperature": -0.5}, "sampling.temperature must be 0 (greedy) or in", id="negative_temperature"
    ),
    pytest.param([1], {"temperature": 1e-40}, "in [0.01, 100], got 9.99995e-41", id="subnormal_temperature"),
    pytest.param([1], {"temperature": 0.0099}, "in [0.01, 100], got 0.0099", id="temperature_below_the_floor"),
    pytest.param([1], {"temperature": 1e30}, "in [0.01, 100], got 1e+30", id="huge_temperature"),
    pytest.param([1], {"temperature": float("inf")}, "in [0.01, 100], got inf", id="infinite_temperature"),
    pytest.param([1], {"temperature": float("nan")}, "in [0.01, 100], got nan", id="nan_temperature"),
    pytest.param([1], {"top_p": float("nan")}, "sampling.top_p must be in (0, 1]", id="nan_top_p"),
    pytest.param([1], {"top_p": 0.0}, "sampling.top_p must be in (0, 1]", id="zero_top_p"),
    pytest.param([1], {"top_p": 1.5}, "sampling.top_p must be in (0, 1]", id="top_p_above_one"),
    pytest.param([1], {"top_k": -1}, "sampling.top_k must be >= 0", id="negative_top_k"),
    pytest.param([1], {"stop_token_ids": [999]}, "sampling.stop_token_ids[0] = 999", id="stop_token_outside"),
]


@pytest.mark.parametrize(("prompt", "params", "field"), BAD_REQUESTS)
async def test_bad_request_is_invalid_argument_naming_the_field(
    cluster: Cluster, prompt: str | list[int], params: dict[str, Any], field: str
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        async for _ in cluster.client.generate(prompt, **params):
            pass
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert field in caught.value.message


async def test_text_and_token_ids_together_are_invalid_argument(cluster: Cluster) -> None:
    # The SDK takes one prompt argument, so send the raw request to check the router itself.
    channel = grpc.aio.insecure_channel(cluster.address)
    stub = router_pb2_grpc.RouterServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in stub.Generate(router_pb2.GenerateRequest(text="hi", token_ids=[1, 2])):
            pass
    await channel.close()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "text or as token_ids, not both" in caught.value.details()


async def test_text_prompt_for_a_model_without_tokenizer_is_invalid_argument(tmp_path: Path) -> None:
    write_model_config(tmp_path)
    router = await serve_router(str(tmp_path), [], "127.0.0.1", 0)  # validation needs no worker
    try:
        async with AsyncClient(f"127.0.0.1:{router.port}") as client:
            with pytest.raises(InvalidArgument, match=r"text: model .* has no tokenizer.*send token_ids"):
                async for _ in client.generate("hello"):
                    pass
    finally:
        await router.stop()


async def test_duplicate_live_request_id_is_already_exists(cluster: Cluster) -> None:
    first = cluster.client.generate([1, 2, 3], max_tokens=600, ignore_eos=True, request_id="same")
    await anext(first)
    with pytest.raises(AlreadyExists, match="request_id 'same' is already live"):
        async for _ in cluster.client.generate([1, 2, 3], max_tokens=5, request_id="same"):
            pass
    first.cancel()
    await cluster.wait_all_pages_free()
    chunks = [c async for c in cluster.client.generate([1], max_tokens=2, request_id="same")]
    assert chunks[-1].finish_reason == "length"  # once the first stream ended, its id is free again


def _validate(prompt: list[int], **sampling: Any) -> router_pb2.GenerateRequest:
    return router_pb2.GenerateRequest(token_ids=prompt, sampling=common_pb2.SamplingParams(**sampling))


def test_unset_sampling_fields_take_the_documented_defaults() -> None:
    valid = validate(_validate([1] * 10), TINY, ByteTokenizer())
    s = valid.sampling
    assert (s.temperature, s.top_k, s.top_p, s.max_tokens) == (1.0, 0, 1.0, 256)


def test_the_router_seeds_every_sampled_request_so_a_move_continues_its_random_stream() -> None:
    seeds = [validate(_validate([1]), TINY, None).sampling.seed for _ in range(8)]
    assert len(set(seeds)) == 8  # 64 random bits each: apart
    assert not validate(_validate([1], temperature=0.0), TINY, None).sampling.HasField("seed")  # greedy needs none


def test_default_max_tokens_shrinks_to_the_room_left_in_the_context() -> None:
    valid = validate(_validate([1] * 4000), TINY, ByteTokenizer())
    assert valid.sampling.max_tokens == 96


def test_given_sampling_fields_are_kept() -> None:
    valid = validate(_validate([1], temperature=0.0, top_k=5, top_p=0.5, max_tokens=7, seed=3), TINY, None)
    s = valid.sampling
    assert (s.temperature, s.top_k, s.top_p, s.max_tokens, s.seed) == (0.0, 5, 0.5, 7, 3)


def test_text_prompts_are_tokenized_by_the_model_tokenizer() -> None:
    request = router_pb2.GenerateRequest(text="hé")
    assert validate(request, TINY, ByteTokenizer()).prompt == list("hé".encode())


def test_nan_temperature_is_refused() -> None:
    with pytest.raises(InvalidRequest, match=r"sampling\.temperature"):
        validate(_validate([1], temperature=float("nan")), TINY, None)
