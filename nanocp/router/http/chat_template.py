"""Chat messages to a prompt, with the model's own chat template (Jinja, as Hugging Face renders it).

A model directory's template comes from chat_template.jinja or tokenizer_config.json's `chat_template`; presets have
random weights and no template of their own, so they get a plain built-in one. A directory without a template takes
completions only: guessing a format would produce prompts the model was never trained on.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from nanocp.model_config import ModelConfig
from nanocp.router.errors import InvalidRequest
from nanocp.router.http.schema import ChatMessage

# The presets' template: role-tagged turns, and the assistant's tag to start its reply.
BUILT_IN = (
    "{% for message in messages %}<|{{ message.role }}|>\n{{ message.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def _raise(message: str) -> None:
    raise jinja2.TemplateError(message)


def _compile(source: str) -> jinja2.Template:
    # The settings Hugging Face renders chat templates with, so a checkpoint's template means the same here.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = lambda value, indent=None, **_: json.dumps(value, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = _raise
    return env.from_string(source)


def _token_text(token: Any) -> str:
    """tokenizer_config.json writes a special token as its text or as {"content": text, ...}."""
    return str(token.get("content", "")) if isinstance(token, dict) else str(token or "")


class ChatTemplate:
    def __init__(self, source: str, special_tokens: dict[str, str]) -> None:
        self._template = _compile(source)
        self._special_tokens = special_tokens

    @classmethod
    def load(cls, model: ModelConfig) -> ChatTemplate | None:
        """The model's template; None when a model directory has none."""
        if model.path is None:
            return cls(BUILT_IN, {})
        directory = Path(model.path)
        config_file = directory / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        special = {key: _token_text(config.get(key)) for key in ("bos_token", "eos_token", "pad_token", "unk_token")}
        jinja_file = directory / "chat_template.jinja"
        source = jinja_file.read_text() if jinja_file.is_file() else config.get("chat_template")
        if isinstance(source, list):  # named templates: the default one
            source = next((t["template"] for t in source if t.get("name") == "default"), None)
        return cls(source, special) if isinstance(source, str) else None

    def render(self, messages: Sequence[ChatMessage]) -> str:
        turns = [{"role": m.role, "content": _text_of(i, m)} for i, m in enumerate(messages)]
        try:
            return self._template.render(messages=turns, add_generation_prompt=True, **self._special_tokens)
        except jinja2.TemplateError as exc:
            raise InvalidRequest(f"messages: the model's chat template refused them: {exc}") from None


def _text_of(index: int, message: ChatMessage) -> str:
    if message.content is None or isinstance(message.content, str):
        return message.content or ""
    texts = []
    for part in message.content:
        if part.type != "text" or part.text is None:
            raise InvalidRequest(f"messages[{index}].content: only text parts are supported, got {part.type!r}")
        texts.append(part.text)
    return "".join(texts)
