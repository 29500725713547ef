"""Response bodies of the completions and chat completions APIs: whole (JSON) or as server-sent events.

A stream is a `data: {chunk}` event per piece of text, then, when asked (stream_options.include_usage), a chunk with
no choices and the usage, then `data: [DONE]`. A failure after the stream began is an `data: {"error": ...}` event.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from nanocp.router.errors import RequestError
from nanocp.router.http.choices import Delta
from nanocp.router.http.errors import error_body

DONE = "data: [DONE]\n\n"


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def sse_error(error: RequestError) -> str:
    return sse(error_body(error))


@dataclass
class Answer:
    """One choice, gathered whole."""

    text: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def add(self, delta: Delta) -> None:
        self.text.append(delta.text)
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason
            self.prompt_tokens, self.completion_tokens = delta.prompt_tokens, delta.completion_tokens


def usage(answers: list[Answer], n: int) -> dict[str, int]:
    """OpenAI counts each prompt once, however many samples (n) it had."""
    prompt = sum(a.prompt_tokens for a in answers[::n])
    completion = sum(a.completion_tokens for a in answers)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class Shape:
    """The body shapes of one API for one request: completions' or chat's."""

    def __init__(self, chat: bool, request_id: str, model: str) -> None:
        self.chat = chat
        self._head = {"id": request_id, "created": int(time.time()), "model": model}

    def whole(self, answers: list[Answer], n: int) -> dict[str, Any]:
        choices = []
        for index, answer in enumerate(answers):
            text = "".join(answer.text)
            choice: dict[str, Any] = {"index": index, "logprobs": None, "finish_reason": answer.finish_reason}
            if self.chat:
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = text
            choices.append(choice)
        kind = "chat.completion" if self.chat else "text_completion"
        return {**self._head, "object": kind, "choices": choices, "usage": usage(answers, n)}

    def chunk(self, index: int, text: str, finish_reason: str | None, first: bool, with_usage: bool) -> str:
        choice: dict[str, Any] = {"index": index, "logprobs": None, "finish_reason": finish_reason}
        if self.chat:
            choice["delta"] = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
        else:
            choice["text"] = text
        body = {**self._head, "object": self._chunk_kind, "choices": [choice]}
        if with_usage:  # OpenAI's clients tell the usage chunk by its choices, and expect usage null before it
            body["usage"] = None
        return sse(body)

    def usage_chunk(self, answers: list[Answer], n: int) -> str:
        return sse({**self._head, "object": self._chunk_kind, "choices": [], "usage": usage(answers, n)})

    @property
    def _chunk_kind(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"
