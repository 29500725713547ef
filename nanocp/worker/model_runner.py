"""Runs a planned step on the device: the model's forward (a CUDA graph's replay where one fits, else eagerly), the
LM head over the rows that sample, and the batched sampler. Owns the KV cache, the attention backend and the graphs.
"""

from __future__ import annotations

import logging
from collections import Counter

import torch

from nanocp.model_config import ModelConfig
from nanocp.worker.attention import PagedAttention, StaticPlan
from nanocp.worker.cuda_graphs import DecodeGraphs, bucket_for, bucket_sizes
from nanocp.worker.kv_cache import KVCache
from nanocp.worker.model import Qwen3Moe, StepContext
from nanocp.worker.planner import StepInputs
from nanocp.worker.sampler import sample
from nanocp.worker.timing import StepTimer

log = logging.getLogger(__name__)


class ModelRunner:
    def __init__(
        self,
        model_config: ModelConfig,
        model: Qwen3Moe,
        cache: KVCache,
        timer: StepTimer,
        static_batch: int | None,
        capture: bool,
    ) -> None:
        """static_batch: the largest batch of decode steps laid out at a bucket's shapes (None: none are); with
        `capture`, replayed as CUDA graphs captured now, else run eagerly at those shapes."""
        self.model_config = model_config
        self.model = model
        self.cache = cache
        self.timer = timer
        self.attention = PagedAttention(cache, model_config.head_dim**-0.5, timer)
        self.static_sizes = bucket_sizes(static_batch) if static_batch is not None else []
        self.graphs = self._capture_graphs(static_batch) if static_batch is not None and capture else None
        self.eager_steps: Counter[str] = Counter()  # steps a graph could not take, by why

    def _capture_graphs(self, max_batch: int) -> DecodeGraphs:
        graphs = DecodeGraphs(self.model, self.attention, max_batch, self.model.shard.size, self.moe_capacity)

        def progress(done: int, total: int) -> None:
            log.info("captured decode graph %d of %d", done, total)

        graphs.capture(progress)
        return graphs

    def static_rows(self, decode_only: bool, max_tokens: int) -> int | None:
        """The bucket a step of the group takes (the same on every member), or None when it runs eagerly."""
        if not self.static_sizes:
            return None
        if not decode_only:
            self.eager_steps["prefill"] += 1
            return None
        if max_tokens > self.static_sizes[-1]:
            self.eager_steps["batch beyond the largest graph"] += 1
            return None
        return bucket_for(max_tokens, self.static_sizes)

    def run(self, inputs: StepInputs) -> list[int]:
        """The step's forward, and the tokens its sampling rows draw (the one read of the device a step)."""
        hidden = self.forward(inputs)
        if not inputs.sampling_chunks:
            return []
        logits = self.model.logits(hidden[inputs.sample_rows])
        return list(sample(logits, inputs.sampling).tolist())

    def forward(self, inputs: StepInputs) -> torch.Tensor:
        """The model over the step's rows: by a graph's replay for a static step, else eagerly."""
        if self.graphs is not None and isinstance(inputs.plan, StaticPlan):
            return self.graphs.forward(inputs)
        return self.eager(inputs)

    def eager(self, inputs: StepInputs) -> torch.Tensor:
        """Hidden states of the step's rows after the final norm, computed eagerly."""
        self.attention.plan = inputs.plan
        tokens = inputs.plan.rows if isinstance(inputs.plan, StaticPlan) else inputs.group_max_tokens
        context = StepContext(inputs.positions, self.attention, self.moe_capacity(tokens), self.timer)
        return self.model(inputs.token_ids, context)

    def moe_capacity(self, tokens: int) -> int:
        """Slots per peer of the MoE route for steps of up to `tokens` home tokens on any member: every (token,
        expert) row of one member could be bound for one peer, at most top-k of them a token (its experts are
        distinct), or as many as the peer holds."""
        per_peer = self.model_config.num_experts // self.model.shard.size
        return tokens * min(self.model_config.experts_per_token, per_peer)
