"""An OpenAI request body to the GenerateRequests of its choices: one per prompt and sample (n), in choice order.

Only the translation lives here; what a value may be is checked by the one validation both faces share
(nanocp.router.validation), so a bad max_tokens gets the same message over HTTP as over gRPC. What only HTTP has
is checked here: the model name, n, and the fields nanocp does not implement, refused by name rather than ignored.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from nanocp.router.errors import InvalidRequest
from nanocp.router.http.chat_template import ChatTemplate
from nanocp.router.http.errors import ModelNotFound
from nanocp.router.http.schema import ChatCompletionRequest, CompletionRequest, SamplingFields
from nanocp.v1 import common_pb2, router_pb2

MAX_CHOICES = 64  # prompts x n in one body: each is a request of its own, admitted and placed apart
MAX_STOPS, MAX_STOP_CHARS = 16, 1000  # matching costs text x stop strings at every token

# Fields that would change the result and that nanocp does not implement, with the value that means "off".
_UNSUPPORTED: dict[str, Any] = {
    "best_of": 1,
    "echo": False,
    "suffix": None,
    "logit_bias": None,
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "repetition_penalty": 1,
    "min_tokens": 0,
    "tools": None,
    "tool_choice": None,
    "functions": None,
    "function_call": None,
    "response_format": None,
}


@dataclass(frozen=True)
class Plan:
    """What one body asks: its choices' requests and how to answer them."""

    id: str
    choices: list[router_pb2.GenerateRequest]  # n samples of each prompt in turn
    n: int
    stop: tuple[str, ...]  # strings that end a choice's text; the stop string itself is not returned
    stream: bool
    include_usage: bool


def _refuse_unsupported(body: SamplingFields) -> None:
    if body.logprobs or body.top_logprobs:
        raise InvalidRequest("logprobs: nanocp does not return log probabilities; leave logprobs unset")
    for name, value in (body.model_extra or {}).items():
        if name in _UNSUPPORTED and value not in (_UNSUPPORTED[name], None, [], {}):
            raise InvalidRequest(f"{name}: not supported by nanocp; leave it unset")
        if name == "response_format" and value not in (None, {"type": "text"}):
            raise InvalidRequest("response_format: only text is supported")


def _sampling(body: SamplingFields, max_tokens: int | None) -> common_pb2.SamplingParams:
    sampling = common_pb2.SamplingParams(ignore_eos=body.ignore_eos)
    given = {"temperature": body.temperature, "top_p": body.top_p, "top_k": body.top_k, "max_tokens": max_tokens}
    for name, value in given.items():
        if value is not None:
            _assign(sampling, name, value)
    for i, token in enumerate(body.stop_token_ids):
        if not -(2**31) <= token < 2**31:
            raise InvalidRequest(f"stop_token_ids[{i}] = {token} is outside the vocabulary")
    sampling.stop_token_ids.extend(body.stop_token_ids)
    return sampling


def _assign(message: Any, name: str, value: float) -> None:
    try:
        setattr(message, name, value)
    except ValueError:  # beyond the wire's integer range: no model has such a limit
        raise InvalidRequest(f"{name}: {value} is out of range") from None


def _choices(
    prompts: list[router_pb2.GenerateRequest], body: SamplingFields, sampling: common_pb2.SamplingParams
) -> list[router_pb2.GenerateRequest]:
    if body.n < 1:
        raise InvalidRequest(f"n must be at least 1, got {body.n}")
    if len(prompts) * body.n > MAX_CHOICES:
        raise InvalidRequest(f"prompts x n = {len(prompts) * body.n} choices; at most {MAX_CHOICES} in one request")
    if body.seed is not None and not 0 <= body.seed < 2**64 - MAX_CHOICES:
        raise InvalidRequest(f"seed must be in [0, 2^64 - {MAX_CHOICES}), got {body.seed}")
    choices = []
    for prompt in prompts:
        for sample in range(body.n):
            request = router_pb2.GenerateRequest()
            request.CopyFrom(prompt)
            request.request_id = uuid.uuid4().hex
            request.sampling.CopyFrom(sampling)
            if body.seed is not None:  # n samples of one seeded request differ, and replay alike
                request.sampling.seed = body.seed + sample
            choices.append(request)
    return choices


def _plan(body: SamplingFields, prompts: list[router_pb2.GenerateRequest], kind: str) -> Plan:
    _refuse_unsupported(body)
    max_tokens = body.max_completion_tokens if isinstance(body, ChatCompletionRequest) else None
    sampling = _sampling(body, max_tokens if max_tokens is not None else body.max_tokens)
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    if any(not s for s in stop):
        raise InvalidRequest("stop: a stop string must not be empty")
    if len(stop) > MAX_STOPS or any(len(s) > MAX_STOP_CHARS for s in stop):
        raise InvalidRequest(f"stop: at most {MAX_STOPS} strings of at most {MAX_STOP_CHARS} characters each")
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    choices = _choices(prompts, body, sampling)
    return Plan(f"{kind}-{uuid.uuid4().hex}", choices, body.n, stop, body.stream, include_usage)


def _check_model(body: SamplingFields, served: str) -> None:
    if body.model != served:
        raise ModelNotFound(body.model, served)


def completion_plan(body: CompletionRequest, served: str) -> Plan:
    _check_model(body, served)
    given = body.prompt
    prompts: list[router_pb2.GenerateRequest]
    if isinstance(given, str):
        prompts = [router_pb2.GenerateRequest(text=given)]
    elif given and all(isinstance(p, str) for p in given):
        prompts = [router_pb2.GenerateRequest(text=p) for p in given if isinstance(p, str)]
    elif given and all(isinstance(p, list) for p in given):
        prompts = [_token_prompt(p) for p in given if isinstance(p, list)]
    else:
        prompts = [_token_prompt([p for p in given if isinstance(p, int)])]
    return _plan(body, prompts, "cmpl")


def _token_prompt(token_ids: list[int]) -> router_pb2.GenerateRequest:
    for i, token in enumerate(token_ids):
        if not -(2**31) <= token < 2**31:
            raise InvalidRequest(f"token_ids[{i}] = {token} is outside the vocabulary")
    return router_pb2.GenerateRequest(token_ids=token_ids)


def chat_plan(body: ChatCompletionRequest, served: str, template: ChatTemplate | None) -> Plan:
    _check_model(body, served)
    if template is None:
        raise InvalidRequest(
            f"messages: model {served!r} has no chat template (tokenizer_config.json); use /v1/completions"
        )
    prompt = router_pb2.GenerateRequest(text=template.render(body.messages))
    return _plan(body, [prompt], "chatcmpl")
