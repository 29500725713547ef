"""Runs a planned step on the device: the model's forward (a CUDA graph's replay where one fits, else eagerly), the
LM head over the rows that sample, and the batched sampler. Owns the KV cache, the attention backend and the graphs.

The sampler (`sample`) picks the next token of every sampling row of a step in one batched call, on the logits' device;
on CUDA a step whose rows are all greedy takes kernels/triton_tokens.py's pick instead (the same tokens, two launches).

Greedy rows take the argmax. The others scale by their temperature, keep their top-k tokens, then the smallest set
whose renormalised mass reaches top-p (the most likely token always stays), and draw by inverse transform: the first
token whose cumulative probability passes a uniform number. That number is a hash of the request's seed and the
index of the token being drawn, computed on the device: a request's draws depend on nothing else (not the batch it
shares, not the instance it runs on), so seeded sampling reproduces anywhere, and a request resumed elsewhere
continues its random stream.

The filtering is FlashInfer's (sort-free renormalisation kernels) on CUDA and sorted torch on CPU, its reference.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

import torch

from nanocp.limits import MAX_TEMPERATURE, MIN_TEMPERATURE
from nanocp.model_config import ModelConfig
from nanocp.worker.attention import PagedAttention, StaticPlan, int64_to_device, to_device
from nanocp.worker.cuda_graphs import DecodeGraphs, bucket_for, bucket_sizes
from nanocp.worker.kv_cache import KVCache
from nanocp.worker.model import Qwen3Moe, StepContext
from nanocp.worker.planner import SamplingRows, StepInputs
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

    def launch(self, inputs: StepInputs, previous: torch.Tensor | None) -> SampledTokens | None:
        """Queues the step's forward and sampling on the device and returns its tokens on their way to the host
        (None when no row samples); nothing here waits for the device. previous: the device tokens of the step
        still in flight, which the placeholders among this step's token ids (pending_token) stand for."""
        if previous is not None:
            inputs.token_ids = resolve_pending(inputs.token_ids, previous)
        hidden = self.forward(inputs)
        if not inputs.sampling_chunks:
            return None
        rows = hidden[inputs.sample_rows]
        if rows.is_cuda and inputs.sampling.all_greedy:
            from nanocp.kernels import triton_tokens  # GPU machines only

            return SampledTokens.of(triton_tokens.greedy(self.model.lm_head(rows), NON_FINITE))
        return SampledTokens.of(sample(self.model.logits(rows), inputs.sampling))

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


NON_FINITE = -1  # the "token" of a row whose logits held NaN or inf: its request ends alone, with an error


def pending_token(row: int) -> int:
    """The placeholder a request's output holds for the token sampling row `row` of the step in flight drew, until
    the host reads it; as a token id of the next step it stands for that token (resolve_pending)."""
    return -2 - row


def resolve_pending(token_ids: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """token_ids with each placeholder replaced by the token it stands for, on the device. A NON_FINITE token
    becomes 0: its request ends when the host reads it, and the row it feeds meanwhile must stay a valid lookup."""
    if token_ids.is_cuda:
        from nanocp.kernels import triton_tokens  # GPU machines only: one launch for what follows

        return triton_tokens.resolve_pending(token_ids, previous)
    rows = (-2 - token_ids).clamp(0, len(previous) - 1)
    return torch.where(token_ids < 0, previous[rows].clamp(min=0), token_ids)


@dataclass(frozen=True)
class SampledTokens:
    """A step's sampled tokens: on the device (what the next step's placeholders resolve from) and on their way
    to a pinned host copy; read() waits for that copy, the one wait for the device a step."""

    device: torch.Tensor
    host: torch.Tensor
    copied: torch.cuda.Event | None  # None on CPU, where the copy is done

    @classmethod
    def of(cls, tokens: torch.Tensor) -> SampledTokens:
        if not tokens.is_cuda:
            return cls(tokens, tokens, None)
        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
        host.copy_(tokens, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()
        return cls(tokens, host, copied)

    def read(self) -> list[int]:
        if self.copied is not None:
            self.copied.synchronize()
        return list(self.host.tolist())


_GOLDEN = -7046029254386353131  # 0x9E3779B97F4A7C15 as a signed 64-bit integer: spreads seeds over the stream
_MIX = (-4658895280553007687, -7723592293110705685)  # SplitMix64's multipliers, signed


def sample(logits: torch.Tensor, rows: SamplingRows) -> torch.Tensor:
    """logits: (rows, vocab) float32. Returns the chosen token ids (rows,) on the logits' device.

    Never raises, whatever the logits: a row whose logits are not all finite, or whose filtered mass vanished, gets
    NON_FINITE instead of a token (found on the device, read with the tokens), so only its own request ends.
    """
    finite = torch.isfinite(logits).all(dim=-1)
    logits = torch.where(finite[:, None], logits, 0.0)  # keeps a bad row's arithmetic harmless; it is dropped
    greedy = logits.argmax(dim=-1)
    if rows.all_greedy:
        return torch.where(finite, greedy, NON_FINITE)
    device, vocab = logits.device, logits.shape[-1]
    # The limits refuse what lies outside these ranges; clamping again keeps a direct caller's value in them too.
    temperature = to_device([p.temperature if not p.greedy else 1.0 for p in rows.params], torch.float32, device)
    temperature = temperature.clamp(MIN_TEMPERATURE, MAX_TEMPERATURE)
    top_k = int64_to_device((p.top_k if 0 < p.top_k < vocab else vocab for p in rows.params), device)
    top_p = to_device([p.top_p for p in rows.params], torch.float32, device)
    top_p = top_p.clamp(torch.finfo(torch.float32).tiny, 1.0)
    # Shifted by the row's maximum first, every scaled logit is <= 0 (or -inf), so softmax never meets inf - inf.
    shifted = logits - logits.max(dim=-1, keepdim=True).values
    probs = torch.softmax(shifted / temperature[:, None], dim=-1)
    probs = _filter(probs, top_k, top_p)
    cumulative = probs.cumsum(dim=-1)
    mass = cumulative[:, -1]
    needle = uniform(rows.seeds, rows.draws, device) * mass
    drawn = torch.searchsorted(cumulative, needle[:, None].to(cumulative.dtype), right=True).squeeze(1)
    # Rounding can put the needle at the very end: the last token of non-zero mass is the one it meant.
    last = vocab - 1 - (probs.flip(-1) > 0).to(torch.int64).argmax(dim=-1)
    drawn = torch.minimum(drawn, last)
    is_greedy = to_device([p.greedy for p in rows.params], torch.bool, device)
    usable = finite & (is_greedy | (mass > 0))  # `mass > 0` is False for NaN too
    return torch.where(usable, torch.where(is_greedy, greedy, drawn), NON_FINITE)


def _filter(probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Each row's probabilities with what top-k, then top-p, exclude set to zero and the rest renormalised."""
    if probs.is_cuda:
        import flashinfer  # GPU machines only

        probs = flashinfer.sampling.top_k_renorm_probs(probs, top_k.to(torch.int32))
        return flashinfer.sampling.top_p_renorm_probs(probs, top_p.to(torch.float32))
    return reference_filter(probs, top_k, top_p)


def reference_filter(probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """The torch version of _filter, over the tokens sorted by probability."""
    ordered, order = probs.sort(dim=-1, descending=True)
    ranks = torch.arange(probs.shape[-1], device=probs.device)
    ordered = ordered * (ranks[None, :] < top_k[:, None])
    ordered = ordered / ordered.sum(dim=-1, keepdim=True)
    # A token stays while the mass before it is still short of top_p: the most likely one always does.
    ordered = ordered * ((ordered.cumsum(dim=-1) - ordered) < top_p[:, None])
    ordered = ordered / ordered.sum(dim=-1, keepdim=True)
    return torch.zeros_like(probs).scatter(-1, order, ordered)


def uniform(seeds: list[int], draws: list[int], device: torch.device) -> torch.Tensor:
    """One number in [0, 1) per (seed, draw), float64: SplitMix64 of seed * golden + draw, in int64 arithmetic
    (wrapping, as on every torch device), its top 53 bits as the fraction."""
    x = int64_to_device((_signed64(s) for s in seeds), device) * _GOLDEN
    x = x + int64_to_device(draws, device)
    x = x ^ _shift_right(x, 30)
    x = x * _MIX[0]
    x = x ^ _shift_right(x, 27)
    x = x * _MIX[1]
    x = x ^ _shift_right(x, 31)
    return _shift_right(x, 11).to(torch.float64) / float(1 << 53)


def _signed64(value: int) -> int:
    """Any integer seed as the int64 of its low 64 bits."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """A logical right shift of int64 (torch's >> is arithmetic: mask away the copied sign bits)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)
