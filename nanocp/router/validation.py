"""What a Generate request may ask, checked before it costs anything, with messages that name the field and limit.

Defaults are resolved here too, so every worker sees fully specified sampling settings: a sampled request that gives
no seed gets one drawn here, so that if it moves to another group after a failure (nanocp.router.migration) it goes
on with the same random stream, exactly as an undisturbed run.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from nanocp.limits import MAX_REQUEST_ID_CHARS, LimitError, check_request
from nanocp.model_config import ModelConfig
from nanocp.placement import Footprint
from nanocp.router.errors import InvalidRequest
from nanocp.tokenizer import Tokenizer
from nanocp.v1 import common_pb2, router_pb2

DEFAULT_MAX_TOKENS = 256


@dataclass(frozen=True)
class ValidRequest:
    prompt: list[int]
    sampling: common_pb2.SamplingParams  # every optional field set

    @property
    def footprint(self) -> Footprint:
        return Footprint(len(self.prompt), self.sampling.max_tokens)


def _prompt(request: router_pb2.GenerateRequest, model: ModelConfig, tokenizer: Tokenizer | None) -> list[int]:
    if request.text and request.token_ids:
        raise InvalidRequest("give the prompt as text or as token_ids, not both")
    if request.token_ids:
        return list(request.token_ids)
    if not request.text:
        raise InvalidRequest("the prompt is empty: set text or token_ids")
    if tokenizer is None:
        raise InvalidRequest(f"text: model {model.name!r} has no tokenizer (no tokenizer.json); send token_ids")
    prompt = tokenizer.encode(request.text)
    if not prompt:
        raise InvalidRequest("text: the prompt encodes to no tokens")
    return prompt


def check_request_id(request_id: str) -> None:
    """Ids are echoed in ListInstances and in error messages: unbounded ones would let one client's ids fill the 4 MB
    message limit of everyone's listing. (Empty is allowed: the router names the request.)"""
    if len(request_id) > MAX_REQUEST_ID_CHARS:
        raise InvalidRequest(f"request_id has {len(request_id)} characters; the limit is {MAX_REQUEST_ID_CHARS}")


def validate(request: router_pb2.GenerateRequest, model: ModelConfig, tokenizer: Tokenizer | None) -> ValidRequest:
    check_request_id(request.request_id)
    prompt = _prompt(request, model, tokenizer)
    context = model.max_context
    given = request.sampling
    sampling = common_pb2.SamplingParams(
        temperature=given.temperature if given.HasField("temperature") else 1.0,
        top_k=given.top_k if given.HasField("top_k") else 0,
        top_p=given.top_p if given.HasField("top_p") else 1.0,
        max_tokens=given.max_tokens if given.HasField("max_tokens") else min(DEFAULT_MAX_TOKENS, context - len(prompt)),
        stop_token_ids=given.stop_token_ids,
        ignore_eos=given.ignore_eos,
    )
    if given.HasField("seed"):
        sampling.seed = given.seed
    elif sampling.temperature > 0:
        sampling.seed = secrets.randbits(64)
    try:
        check_request(prompt, sampling, model)
    except LimitError as exc:
        raise InvalidRequest(str(exc)) from None
    return ValidRequest(prompt, sampling)
