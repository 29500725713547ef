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
