"""What an instance refuses before a request reaches its engine: limits, placements it cannot serve, live ids.

Reads only immutable settings, so any thread may call it: the worker's gRPC thread refuses at once, and the engine
keeps the same guard for direct callers.
"""

from __future__ import annotations

from collections.abc import Collection

from nanocp.limits import LimitError, check_request
from nanocp.model_config import ModelConfig
from nanocp.placement import Footprint, Shard, check_shards, covered_tokens
from nanocp.worker.config import EngineConfig
from nanocp.worker.request import EngineError, SamplingParams


class Admission:
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
        problem = check_shards(shards, self.group_size, c.page_size)
        covered = covered_tokens(shards, c.page_size) if problem is None else 0
        # It must hold the prompt and the first sampled token; beyond that the placement may grow as it decodes.
        needed = min(len(prompt) + params.max_tokens - 1, len(prompt) + 1)
        if problem is None and covered < needed:
            problem = f"its shards cover {covered} positions, the request needs at least {needed}"
        if problem is not None:
            raise EngineError("INVALID_ARGUMENT", f"placement: {problem}")
        pages = max(s.page_quota for s in shards)
        if pages > c.num_pages:
            raise EngineError(
                "RESOURCE_EXHAUSTED",
                f"the request needs {pages} KV pages ({len(prompt)} prompt + {params.max_tokens} new tokens); "
                f"this instance has {c.num_pages} pages of {c.page_size} tokens",
            )

    @staticmethod
    def check_new_id(request_id: str, live: Collection[str]) -> None:
        if request_id in live:
            raise EngineError("ALREADY_EXISTS", f"request {request_id!r} is already running")
