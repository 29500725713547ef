"""What a request may ask of a model, checked in one place by the router (for callers) and the engine (its own guard).

Messages name the field and the limit, so a person can fix the request from the message alone. The sampling ranges
are the ones the sampler (nanocp.worker.model_runner.sample) is built for: temperature 0 (greedy) or within
[MIN_TEMPERATURE, MAX_TEMPERATURE], top_p in (0, 1], top_k >= 0, any 64-bit seed. Values arrive as float32 on the
wire, so a bound given as 0.01 is compared as the float32 a client sending 0.01 produces.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Protocol

from nanocp.model_config import ModelConfig

# Below 0.01 every distribution is its argmax to within float32 rounding (ask for 0, greedy, instead); above 100 it
# is uniform to within 1% for logits spread over a few units. Outside these the sampler's clamp would change the
# request silently, so the limits refuse it instead.
MIN_TEMPERATURE = 0.01
MAX_TEMPERATURE = 100.0
MAX_REQUEST_ID_CHARS = 256  # ids travel in every output, log line and ListInstances answer


class LimitError(ValueError):
    """A request outside the model's or the sampler's limits."""


def as_float32(value: float) -> float:
    """`value` rounded to float32, as the wire carries sampling settings."""
    return float(struct.unpack("f", struct.pack("f", value))[0])


class Sampling(Protocol):
    """Resolved sampling settings: the engine's SamplingParams and the wire's SamplingParams both fit."""

    @property
    def temperature(self) -> float: ...

    @property
    def top_k(self) -> int: ...

    @property
    def top_p(self) -> float: ...

    @property
    def max_tokens(self) -> int: ...

    @property
    def stop_token_ids(self) -> Sequence[int]: ...


def check_vocabulary(field: str, token_ids: Sequence[int], vocab_size: int) -> None:
    for i, token in enumerate(token_ids):
        if not 0 <= token < vocab_size:
            raise LimitError(f"{field}[{i}] = {token} is outside the vocabulary [0, {vocab_size})")


def check_request(prompt: Sequence[int], sampling: Sampling, model: ModelConfig) -> None:
    if not prompt:
        raise LimitError("the prompt is empty: set text or token_ids")
    check_vocabulary("token_ids", prompt, model.vocab_size)
    context = model.max_context
    if len(prompt) >= context:
        raise LimitError(
            f"prompt: {len(prompt)} tokens leave no room to generate in the model's context of {context} tokens "
            f"(at most {context - 1} prompt tokens)"
        )
    if sampling.max_tokens < 1:
        raise LimitError(f"sampling.max_tokens must be at least 1, got {sampling.max_tokens}")
    if len(prompt) + sampling.max_tokens > context:
        raise LimitError(
            f"sampling.max_tokens: prompt ({len(prompt)}) + max_tokens ({sampling.max_tokens}) = "
            f"{len(prompt) + sampling.max_tokens} tokens exceed the model's context of {context} tokens"
        )
    check_sampling(sampling)
    check_vocabulary("sampling.stop_token_ids", sampling.stop_token_ids, model.vocab_size)


def check_sampling(sampling: Sampling) -> None:
    """The sampler's ranges; comparisons are written so that NaN fails every one of them."""
    t = sampling.temperature
    if not (t == 0 or as_float32(MIN_TEMPERATURE) <= t <= as_float32(MAX_TEMPERATURE)):
        raise LimitError(
            f"sampling.temperature must be 0 (greedy) or in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}], got {t:g}"
        )
    if not 0 < sampling.top_p <= 1:
        raise LimitError(f"sampling.top_p must be in (0, 1], got {sampling.top_p:g}")
    if sampling.top_k < 0:
        raise LimitError(f"sampling.top_k must be >= 0 (0 turns it off), got {sampling.top_k}")


def check_request_id(request_id: str) -> None:
    if not request_id:
        raise LimitError("request_id is empty")
    if len(request_id) > MAX_REQUEST_ID_CHARS:
        raise LimitError(f"request_id has {len(request_id)} characters, at most {MAX_REQUEST_ID_CHARS} are allowed")
