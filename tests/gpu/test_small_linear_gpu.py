"""The model's projections at a decode step's few rows (the Triton kernel of kernels/triton_linear.py) against float32
on the same bf16 inputs, its rows strided as in a view, and a CUDA graph's replay after a norm launched with PDL
against the eager call bit for bit; more rows than it takes go to cuBLAS unchanged."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nanocp import kernels
from nanocp.worker.model import Linear

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
triton_linear = pytest.importorskip("nanocp.kernels.triton_linear", reason="needs Triton (GPU machines)")

BF16 = torch.bfloat16
SHAPES = {"qkv": (5120, 2048), "o": (2048, 4096), "gate": (128, 2048), "odd": (100, 300)}  # (outputs, depth)


def projection(outputs: int, depth: int) -> Linear:
    layer = Linear(depth, outputs).cuda().to(BF16)
    torch.nn.init.normal_(layer.weight, std=depth**-0.5)
    return layer


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rows", [1, triton_linear.MAX_ROWS, triton_linear.MAX_ROWS_SMALL])
def test_small_linear_matches_float32(shape: str, rows: int) -> None:
    outputs, depth = SHAPES[shape]
    layer = projection(outputs, depth)
    x = torch.randn(rows, depth, device="cuda").to(BF16)
    small = layer.weight.numel() <= triton_linear.SMALL_WEIGHT
    assert triton_linear.applies(x, layer.weight) == (rows <= triton_linear.MAX_ROWS or small)
    ref = F.linear(x.float(), layer.weight.float())
    out = layer(x)
    assert out.shape == (rows, outputs) and out.dtype == BF16
    # Each output a float32 sum rounded once to bf16: within half a bf16 ulp (2**-8 relative) of the float32 result,
    # up to the float32 sums' own order.
    assert ((out.float() - ref).abs() <= ref.abs() * 2**-8 + 1e-4).all()


def test_strided_rows_and_more_rows_than_it_takes() -> None:
    layer = projection(2048, 4096)
    qkv = torch.randn(2, 5120, device="cuda").to(BF16)
    q = qkv[:, :4096]  # a view: rows 5120 apart
    assert torch.equal(layer(q), triton_linear.small_linear(q.contiguous(), layer.weight))
    many = torch.randn(triton_linear.MAX_ROWS_SMALL + 1, 4096, device="cuda").to(BF16)
    assert not triton_linear.applies(many, layer.weight)
    assert torch.equal(layer(many), F.linear(many, layer.weight))


def test_replay_after_a_pdl_norm_equals_the_eager_call() -> None:
    layer = projection(5120, 2048)
    x = torch.randn(2, 2048, device="cuda").to(BF16)
    norm = torch.ones(2048, device="cuda", dtype=BF16)

    def step() -> torch.Tensor:
        return layer(kernels.rms_norm(x, norm, 1e-6))

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # compiles outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        replayed = step()
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(replayed, step()), "the replay read the norm's new output, not a stale one"
