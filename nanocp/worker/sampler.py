"""Picks the next token of every sampling row of a step in one batched call, on the logits' device.

Greedy rows take the argmax. The others scale by their temperature, keep their top-k tokens, then the smallest set
whose renormalised mass reaches top-p (the most likely token always stays), and draw by inverse transform: the first
token whose cumulative probability passes a uniform number. That number is a hash of the request's seed and the
index of the token being drawn, computed on the device: a request's draws depend on nothing else (not the batch it
shares, not the instance it runs on), so seeded sampling reproduces anywhere, and a request resumed elsewhere
continues its random stream.

The filtering is FlashInfer's (sort-free renormalisation kernels) on CUDA and sorted torch on CPU, its reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nanocp.worker.request import SamplingParams

_GOLDEN = -7046029254386353131  # 0x9E3779B97F4A7C15 as a signed 64-bit integer: spreads seeds over the stream
_MIX = (-4658895280553007687, -7723592293110705685)  # SplitMix64's multipliers, signed


@dataclass(frozen=True)
class SamplingRows:
    """The settings of a step's sampling rows, in row order."""

    params: list[SamplingParams]
    seeds: list[int]  # per row, the request's seed (its own, or one the engine drew)
    draws: list[int]  # per row, the index of the token being drawn: the request's output length so far

    @property
    def all_greedy(self) -> bool:
        return all(p.greedy for p in self.params)


def sample(logits: torch.Tensor, rows: SamplingRows) -> torch.Tensor:
    """logits: (rows, vocab) float32. Returns the chosen token ids (rows,) on the logits' device."""
    greedy = logits.argmax(dim=-1)
    if rows.all_greedy:
        return greedy
    device, vocab = logits.device, logits.shape[-1]
    temperature = torch.tensor([p.temperature if not p.greedy else 1.0 for p in rows.params], device=device)
    top_k = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in rows.params], device=device)
    top_p = torch.tensor([p.top_p for p in rows.params], device=device)
    probs = torch.softmax(logits / temperature[:, None], dim=-1)
    probs = _filter(probs, top_k, top_p)
    cumulative = probs.cumsum(dim=-1)
    needle = uniform(rows.seeds, rows.draws, device) * cumulative[:, -1]
    drawn = torch.searchsorted(cumulative, needle[:, None].to(cumulative.dtype), right=True).squeeze(1)
    # Rounding can put the needle at the very end: the last token of non-zero mass is the one it meant.
    last = vocab - 1 - (probs.flip(-1) > 0).to(torch.int64).argmax(dim=-1)
    drawn = torch.minimum(drawn, last)
    is_greedy = torch.tensor([p.greedy for p in rows.params], device=device)
    return torch.where(is_greedy, greedy, drawn)


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
    x = torch.tensor([_signed64(s) for s in seeds], dtype=torch.int64, device=device) * _GOLDEN
    x = x + torch.tensor(draws, dtype=torch.int64, device=device)
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
