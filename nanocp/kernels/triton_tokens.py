"""A step's token work around the model on CUDA, in one or two launches where torch spends six to thirteen: the
greedy pick of a step whose rows are all greedy, and the placeholders of the step in flight resolved into the next
step's token ids.

Why: after a graph's replay the device runs these small launches one after another, a few microseconds each,
however small their work; at one row a step spent about 110 us in them (bench/results/profile_decode_gpu_outside.json,
its chrome trace): the greedy pick took a cast to float32, four launches for isfinite, an all, a where, the argmax
and a where again; resolving the placeholders six more.

Both compute what the torch code in worker/model_runner.py computes (its reference, and what CPU runs): the first
maximal logit's index, NON_FINITE for a row with any logit NaN or infinite; each placeholder's token from the step in
flight, NON_FINITE read as 0.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nanocp.kernels.triton_pdl import await_inputs, launch_options

PICK_BLOCK = 4096  # logits a program of the greedy pick reads: 38 programs a row of Qwen3's 151,936
RESOLVE_BLOCK = 1024


@triton.jit
def _greedy_chunks_kernel(  # type: ignore[no-untyped-def]
    logits_ptr,
    best_ptr,
    index_ptr,
    bad_ptr,
    vocab,
    CHUNKS: tl.constexpr,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):
    await_inputs(PDL)
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    cols = chunk * BLOCK + tl.arange(0, BLOCK)
    valid = cols < vocab
    x = tl.load(logits_ptr + row * vocab + cols, mask=valid, other=float("-inf")).to(tl.float32)
    finite = (x == x) & (tl.abs(x) != float("inf"))
    x = tl.where(finite, x, float("-inf"))  # a row with a bad logit is dropped whatever its maximum
    part = row * CHUNKS + chunk
    tl.store(best_ptr + part, tl.max(x, axis=0))
    tl.store(index_ptr + part, tl.argmax(x, axis=0, tie_break_left=True))  # the first maximal, as torch's
    tl.store(bad_ptr + part, tl.sum((valid & ~finite).to(tl.int32), axis=0))


@triton.jit
def _greedy_pick_kernel(  # type: ignore[no-untyped-def]
    best_ptr,
    index_ptr,
    bad_ptr,
    tokens_ptr,
    non_finite,
    CHUNKS: tl.constexpr,
    CHUNKS_BLOCK: tl.constexpr,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):
    await_inputs(PDL)
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, CHUNKS_BLOCK)
    parts = row * CHUNKS + c
    best = tl.load(best_ptr + parts, mask=c < CHUNKS, other=float("-inf"))
    bad = tl.sum(tl.load(bad_ptr + parts, mask=c < CHUNKS, other=0), axis=0)
    first = tl.argmax(best, axis=0, tie_break_left=True)  # chunks in order: the first chunk holding the maximum
    token = first.to(tl.int64) * BLOCK + tl.load(index_ptr + row * CHUNKS + first).to(tl.int64)
    tl.store(tokens_ptr + row, tl.where(bad > 0, non_finite, token))


def greedy(logits: torch.Tensor, non_finite: int) -> torch.Tensor:
    """Each row's first maximal logit's index (rows,) int64, or `non_finite` for a row with a NaN or infinite logit.
    logits: (rows, vocab), any float dtype (the LM head's own: a cast would not move the maximum)."""
    rows, vocab = logits.shape
    logits = logits.contiguous()
    tokens = torch.empty(rows, dtype=torch.int64, device=logits.device)
    if not rows:
        return tokens
    chunks = triton.cdiv(vocab, PICK_BLOCK)
    best = torch.empty(rows, chunks, dtype=torch.float32, device=logits.device)
    index = torch.empty(rows, chunks, dtype=torch.int32, device=logits.device)
    bad = torch.empty(rows, chunks, dtype=torch.int32, device=logits.device)
    options = launch_options(logits)
    _greedy_chunks_kernel[(rows, chunks)](logits, best, index, bad, vocab, chunks, PICK_BLOCK, num_warps=8, **options)
    _greedy_pick_kernel[(rows,)](
        best, index, bad, tokens, non_finite, chunks, triton.next_power_of_2(chunks), PICK_BLOCK, num_warps=1, **options
    )
    return tokens


@triton.jit
def _resolve_kernel(ids_ptr, previous_ptr, out_ptr, count, last, BLOCK: tl.constexpr, PDL: tl.constexpr):  # type: ignore[no-untyped-def]
    await_inputs(PDL)
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = i < count
    token = tl.load(ids_ptr + i, mask=valid, other=0)
    pending = token < 0
    row = tl.minimum(tl.maximum(-2 - token, 0), last)
    drawn = tl.load(previous_ptr + row, mask=valid & pending, other=0)
    tl.store(out_ptr + i, tl.where(pending, tl.maximum(drawn, 0), token), mask=valid)


def resolve_pending(token_ids: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """model_runner.resolve_pending on CUDA: each placeholder (-2 - row) replaced by previous[row], a NON_FINITE
    token by 0."""
    token_ids = token_ids.contiguous()
    out = torch.empty_like(token_ids)
    count = token_ids.numel()
    if count:
        _resolve_kernel[(triton.cdiv(count, RESOLVE_BLOCK),)](
            token_ids, previous, out, count, max(previous.numel() - 1, 0), RESOLVE_BLOCK, **launch_options(token_ids)
        )
    return out
