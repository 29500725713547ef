"""What a generate stream yields."""

from __future__ import annotations

from dataclasses import dataclass, field

from nanocp.placement import Placement
from nanocp.v1 import common_pb2, router_pb2
from nanocp.wire import finish_reason_name, placement_from_proto


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Chunk:
    request_id: str
    token_ids: list[int] = field(default_factory=list)
    text: str = ""  # the tokens' text, when the model has a tokenizer
    placement: Placement | None = None  # on the first chunk
    finish_reason: str | None = None  # "stop", "length" or "abort", on the last chunk
    usage: Usage | None = None  # on the last chunk

    @classmethod
    def from_proto(cls, response: router_pb2.GenerateResponse) -> Chunk:
        last = response.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED
        return cls(
            request_id=response.request_id,
            token_ids=list(response.token_ids),
            text=response.text,
            placement=placement_from_proto(response.placement) if response.HasField("placement") else None,
            finish_reason=finish_reason_name(response.finish_reason) if last else None,
            usage=Usage(response.usage.prompt_tokens, response.usage.completion_tokens) if last else None,
        )
