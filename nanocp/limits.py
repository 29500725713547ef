"""What a request may ask of a model, checked in one place by the router (for callers) and the engine (its own guard).

Messages name the field and the limit, so a person can fix the request from the message alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from nanocp.model_config import ModelConfig


class LimitError(ValueError):
    """A request outside the model's or the sampler's limits."""


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
    if not sampling.temperature >= 0:  # also refuses NaN
        raise LimitError(f"sampling.temperature must be >= 0 (0 is greedy), got {sampling.temperature:g}")
    if not 0 < sampling.top_p <= 1:
        raise LimitError(f"sampling.top_p must be in (0, 1], got {sampling.top_p:g}")
    if sampling.top_k < 0:
        raise LimitError(f"sampling.top_k must be >= 0 (0 turns it off), got {sampling.top_k}")
    check_vocabulary("sampling.stop_token_ids", sampling.stop_token_ids, model.vocab_size)
