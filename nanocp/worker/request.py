"""A request as the engine sees it: prompt, sampling settings, generated tokens, KV pages, and what it emits; and
what an instance refuses before a request reaches its engine (`Admission`)."""

from __future__ import annotations

import enum
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

from nanocp.limits import LimitError, check_request, check_request_id
from nanocp.model_config import ModelConfig
from nanocp.placement import Footprint, Shard, asks_to_grow, check_shards, covered_tokens
from nanocp.worker.config import EngineConfig


class EngineError(Exception):
    """A request the engine refuses; `code` names the gRPC status a service should answer with."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code  # "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "ALREADY_EXISTS" or "NOT_FOUND"


class FinishReason(enum.Enum):
    STOP = "stop"  # an end-of-sequence or stop token was sampled
    LENGTH = "length"  # max_tokens reached
    ABORT = "abort"  # aborted by the caller, or the engine shut down


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 is greedy
    top_k: int = 0  # 0 keeps every token
    top_p: float = 1.0
    seed: int | None = None
    max_tokens: int = 256
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    # Tokens generated before this submission (a request resumed after its group failed; they end its prompt): the
    # index of its first new token, where its random stream continues.
    token_offset: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class RequestOutput:
    """What one step produced for a request; the last one has `finish_reason` set."""

    request_id: str
    new_token_ids: list[int]
    finish_reason: FinishReason | None
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None  # why the engine failed the request, when it did
    error_code: str = "INTERNAL"  # the gRPC status of that failure
    needs_pages: bool = False  # the tail's quota runs low: the placement should grow


@dataclass(frozen=True)
class EngineLoad:
    running: int
    waiting: int
    pages_total: int
    pages_in_use: int  # allocated to requests' KV
    pages_committed: int  # reserved by admitted requests (in use or not)


OutputCallback = Callable[[RequestOutput], None]


@dataclass(eq=False)
class Request:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    on_output: OutputCallback
    stop_ids: frozenset[int]
    shards: list[Shard]  # where its KV lives, in position order
    coverage: int  # positions the shards can hold: the tail's end
    key: int = 0  # names the request to the group's other instances (unique in the group)
    asked_pages_at: int = 0  # the coverage when it last asked for its placement to grow
    # Generated tokens; the last `pending` of them are placeholders (pending_token) for tokens a launched step has
    # sampled on the device and the host has not read yet.
    output: list[int] = field(default_factory=list)
    pending: int = 0
    num_computed: int = 0  # tokens whose K, V are in the cache
    seed: int = 0  # of its random stream when it samples (its own, or one the engine drew)

    def token_slice(self, start: int, end: int) -> list[int]:
        """Tokens start:end of prompt + output, without joining the two (a long prompt would be copied each step)."""
        split = len(self.prompt)
        if end <= split:
            return self.prompt[start:end]
        if start >= split:
            return self.output[start - split : end - split]
        return self.prompt[start:] + self.output[: end - split]

    @property
    def token_index(self) -> int:
        """The index of the token it draws next, counted from its first generated token (anywhere)."""
        return self.params.token_offset + len(self.output)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.output)

    @property
    def completed(self) -> int:
        """Generated tokens the host has read (and emitted)."""
        return len(self.output) - self.pending

    @property
    def decodable(self) -> bool:
        """Whether a decode step may run for it: prefilled, its tail has room for the K, V it stores, and it may
        still sample (a pending token may already be its last)."""
        return not self.prefilling and self.num_computed < self.coverage and len(self.output) < self.params.max_tokens

    @property
    def prefilling(self) -> bool:
        return self.num_computed < len(self.prompt)

    def should_ask_for_pages(self, page_size: int) -> bool:
        """True, once per coverage, when the placement should grow (nanocp.placement's rule, the router's too)."""
        if self.asked_pages_at == self.coverage:
            return False
        footprint = Footprint(len(self.prompt), self.params.max_tokens)
        if not asks_to_grow(self.shards, footprint, self.num_tokens, page_size):
            return False
        self.asked_pages_at = self.coverage
        return True

    def shard_at(self, position: int) -> int:
        """Index of the shard covering `position`."""
        return max(i for i, s in enumerate(self.shards) if s.start <= position)

    def finish_reason_after(self, token: int, index: int) -> FinishReason | None:
        """Why it ends with `token` as generated token `index`, or None."""
        if token in self.stop_ids:
            return FinishReason.STOP
        if index + 1 >= self.params.max_tokens:
            return FinishReason.LENGTH
        return None


class Admission:
    """Refuses what the group can never serve: limits, placements it cannot hold, live ids. Reads only immutable
    settings, so any thread may call it: the worker's gRPC thread refuses at once, and the engine keeps the same
    guard for direct callers."""

    def __init__(self, model_config: ModelConfig, config: EngineConfig, rank: int, group_size: int) -> None:
        self.model_config = model_config
        self.config = config
        self.rank = rank
        self.group_size = group_size

    def local_placement(self, prompt: list[int], params: SamplingParams) -> list[Shard]:
        """One shard, here, for the request's whole footprint."""
        return [Shard(self.rank, 0, Footprint(len(prompt), params.max_tokens).pages(self.config.page_size))]

    def check(self, prompt: list[int], params: SamplingParams, shards: list[Shard]) -> None:
        """Refuses what the group can never serve."""
        c = self.config
        try:
            check_request(prompt, params, self.model_config)
        except LimitError as exc:
            raise EngineError("INVALID_ARGUMENT", str(exc)) from None
        if not 0 <= params.token_offset < len(prompt):  # the tokens generated before end the prompt
            raise EngineError(
                "INVALID_ARGUMENT",
                f"tokens_generated must be from 0 to the prompt's length - 1 ({len(prompt) - 1}), "
                f"got {params.token_offset}",
            )
        problem = check_shards(shards, self.group_size, c.page_size)
        covered = covered_tokens(shards, c.page_size) if problem is None else 0
        # It must hold the prompt and the first sampled token; beyond that the placement may grow as it decodes.
        needed = min(len(prompt) + params.max_tokens - 1, len(prompt) + 1)
        if problem is None and covered < needed:
            problem = f"its shards cover {covered} positions, the request needs at least {needed}"
        if problem is not None:
            raise EngineError("INVALID_ARGUMENT", f"placement: {problem}")
        self._check_quotas(shards, f" ({len(prompt)} prompt + {params.max_tokens} new tokens)")

    def check_grown(self, shards: list[Shard]) -> None:
        """Refuses a grown placement that no group could hold, whatever the request's current one."""
        problem = check_shards(shards, self.group_size, self.config.page_size)
        if problem is not None:
            raise EngineError("INVALID_ARGUMENT", f"placement: {problem}")
        self._check_quotas(shards, "")

    def _check_quotas(self, shards: list[Shard], why: str) -> None:
        """A shard's quota beyond a whole pool (the group's instances have alike pools) can never be held."""
        pages = max(s.page_quota for s in shards)
        if pages > self.config.num_pages:
            raise EngineError(
                "RESOURCE_EXHAUSTED",
                f"the request needs {pages} KV pages on one instance{why}; "
                f"this instance has {self.config.num_pages} pages of {self.config.page_size} tokens",
            )

    @staticmethod
    def check_id(request_id: str) -> None:
        try:
            check_request_id(request_id)
        except LimitError as exc:
            raise EngineError("INVALID_ARGUMENT", str(exc)) from None

    @staticmethod
    def check_new_id(request_id: str, live: Collection[str]) -> None:
        Admission.check_id(request_id)
        if request_id in live:
            raise EngineError("ALREADY_EXISTS", f"request {request_id!r} is already running")
