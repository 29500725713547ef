"""Text to token ids and back: the model directory's tokenizer.json, or bytes for presets that ship none."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from nanocp.model_config import ModelConfig


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def decode(self, token_ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255; ids above that are special tokens and decode to nothing."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, token_ids: list[int]) -> str:
        return bytes(t for t in token_ids if 0 <= t < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer as _Tokenizer

        self._tokenizer = _Tokenizer.from_file(str(path))

    def encode(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, token_ids: list[int]) -> str:
        return str(self._tokenizer.decode(token_ids, skip_special_tokens=True))


def load_tokenizer(config: ModelConfig) -> Tokenizer | None:
    """None when the model directory has no tokenizer.json: such a model takes token ids only."""
    if config.path is None:
        return ByteTokenizer()
    file = Path(config.path) / "tokenizer.json"
    return HFTokenizer(file) if file.is_file() else None


class IncrementalDecoder:
    """Turns a growing list of token ids into text deltas, holding back bytes of an unfinished character."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._emitted = ""

    def push(self, token_ids: list[int]) -> str:
        self._ids.extend(token_ids)
        text = self._tokenizer.decode(self._ids)
        if text.endswith("\ufffd"):
            return ""
        delta = text[len(self._emitted) :]
        self._emitted = text
        return delta
