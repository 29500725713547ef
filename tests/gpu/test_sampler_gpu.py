"""The sampler on the GPU: FlashInfer's renormalisation equals the torch reference, and a draw on the GPU is the
draw on the CPU (the same seed and index give the same uniform number on both devices).

Skips without CUDA. On the GPU machine: python3 -m pytest --noconftest -q tests/gpu.
"""

from __future__ import annotations

import pytest
import torch

from nanocp.worker.model_runner import _filter, reference_filter, sample, uniform
from nanocp.worker.planner import SamplingRows
from nanocp.worker.request import SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_flashinfer_filters_equal_the_reference() -> None:
    generator = torch.Generator(device="cuda").manual_seed(0)
    probs = torch.softmax(torch.randn(8, 151936, device="cuda", generator=generator) * 3, dim=-1)
    top_k = torch.tensor([1, 5, 50, 151936, 20, 151936, 1000, 2], device="cuda")
    top_p = torch.tensor([1.0, 1.0, 0.9, 0.5, 0.99, 1.0, 0.3, 0.7], device="cuda")
    torch.testing.assert_close(_filter(probs, top_k, top_p), reference_filter(probs, top_k, top_p), atol=1e-5, rtol=0)


def test_uniform_numbers_are_the_same_on_both_devices() -> None:
    seeds, draws = [0, 1, -7, 2**62, 123456789], [0, 3, 9, 1, 77]
    assert uniform(seeds, draws, torch.device("cuda")).tolist() == uniform(seeds, draws, torch.device("cpu")).tolist()


def test_a_draw_on_the_gpu_is_the_draw_on_the_cpu() -> None:
    logits = torch.randn(16, 1000, generator=torch.Generator().manual_seed(3))
    params = [SamplingParams(temperature=0.8, top_k=50, top_p=0.9)] * 8 + [SamplingParams(temperature=0.0)] * 8
    rows = SamplingRows(params, list(range(16)), list(range(16)))
    assert sample(logits.cuda(), rows).tolist() == sample(logits, rows).tolist()


@pytest.mark.parametrize(("rows", "vocab"), [(1, 151936), (7, 151936), (64, 5000), (3, 4097)])
def test_the_greedy_pick_is_the_samplers_argmax(rows: int, vocab: int) -> None:
    """kernels/triton_tokens.py's pick on the LM head's bf16 logits against the sampler's greedy path on them in
    float32: ties go to the first index (across the kernel's chunks too), a row with NaN or inf to NON_FINITE."""
    from nanocp.kernels import triton_tokens
    from nanocp.worker.model_runner import NON_FINITE

    logits = (torch.randn(rows, vocab, generator=torch.Generator().manual_seed(rows)) * 3).to(torch.bfloat16)
    logits[0, [5, vocab - 1]] = logits[0].max() + 1  # a tie, in the first and the last chunk
    if rows > 2:
        logits[1, vocab // 2] = float("nan")
        logits[2, 0] = float("-inf")
    greedy = SamplingRows([SamplingParams(temperature=0.0)] * rows, [0] * rows, [0] * rows)
    expected = sample(logits.float(), greedy).tolist()
    assert expected[0] == 5
    assert triton_tokens.greedy(logits.cuda(), NON_FINITE).tolist() == expected


def test_placeholders_resolve_as_the_torch_code_does() -> None:
    from nanocp.kernels import triton_tokens
    from nanocp.worker.model_runner import NON_FINITE, pending_token, resolve_pending

    previous = torch.tensor([11, NON_FINITE, 7, 3])
    token_ids = torch.tensor([pending_token(0), 42, pending_token(1), pending_token(3), 0, pending_token(2)])
    expected = resolve_pending(token_ids, previous)  # on the CPU: the torch code
    assert expected.tolist() == [11, 42, 0, 3, 0, 7]
    assert triton_tokens.resolve_pending(token_ids.cuda(), previous.cuda()).tolist() == expected.tolist()
