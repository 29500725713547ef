"""The request bodies of OpenAI's completions and chat completions APIs, with the fields clients send.

Fields nanocp does not implement and that would change the result (logprobs, best_of, echo, penalties, tools, ...)
are refused in `requests` with a message naming them; fields that only describe the caller (user, metadata) are
accepted and ignored, so ordinary clients work unchanged.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    """What both APIs share: the sampling settings, streaming, and nanocp's (and vLLM's) extensions."""

    model_config = ConfigDict(extra="allow")  # unknown fields are checked by `requests.refuse_unsupported`

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # extension, as vLLM's
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] = Field(default_factory=list)  # extension, as vLLM's
    ignore_eos: bool = False  # extension, as vLLM's
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: Any = None
    top_logprobs: int | None = None
    user: str | None = None


class CompletionRequest(SamplingFields):
    # A string, strings, token ids, or lists of token ids: one choice (n of them) per prompt.
    prompt: str | list[str] | list[int] | list[list[int]]


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None  # the newer name of max_tokens
