"""Picks each request's next token from its logits: greedy, or temperature / top-k / top-p with a seeded generator."""

from __future__ import annotations

import torch

from nanocp.worker.request import SamplingParams


def _filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """logits: (vocab,). Masks to -inf what top-k and top-p exclude; the most likely token always stays."""
    if 0 < top_k < logits.shape[-1]:
        threshold = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < threshold, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # Drop a token once the mass before it already reaches top_p.
        drop_sorted = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> list[int]:
    """logits: (requests, vocab) in float32, one row per request that samples this step."""
    greedy = logits.argmax(dim=-1).tolist()
    tokens: list[int] = []
    for row, (p, generator) in enumerate(zip(params, generators, strict=True)):
        if p.greedy:
            tokens.append(int(greedy[row]))
            continue
        filtered = _filter_top_k_top_p(logits[row] / p.temperature, p.top_k, p.top_p)
        probs = torch.softmax(filtered, dim=-1)
        tokens.append(int(torch.multinomial(probs.cpu(), 1, generator=generator).item()))
    return tokens
