"""Every GPU kernel against the torch reference, both on the GPU: the reference runs on float32 copies of the same
bf16 inputs, so what differs is the kernels' own arithmetic (bf16 products, fp32 accumulation).

Tolerances: outputs by relative error ||out - ref|| / ||ref|| < 1e-2 (bf16 operands land between 1e-3 and 1e-2);
log-sum-exp by absolute error < 1e-2 in natural log; empty segments and parts exactly (o = 0, lse = -inf).
Skips without CUDA. On the GPU machine: python3 -m pytest --noconftest -q tests/gpu (the repository's conftest
needs the gRPC stack, which the GPU machine lacks and these tests don't use).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from nanocp import kernels
from nanocp.kernels.attention import reference_merge_states, reference_paged_attention, reference_store_kv
from nanocp.kernels.moe import reference_grouped_swiglu

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

PAGE, HEADS, KV_HEADS, DIM = 16, 32, 4, 128  # Qwen3-30B-A3B attention: GQA 32 / 4, head_dim 128
SCALE = DIM**-0.5
BF16 = torch.bfloat16


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def assert_lse_close(lse: torch.Tensor, ref: torch.Tensor) -> None:
    assert lse.dtype == torch.float32
    empty = torch.isneginf(ref)
    assert torch.equal(torch.isneginf(lse), empty)
    assert not lse.isnan().any()
    assert (lse[~empty] - ref[~empty]).abs().max().item() < 1e-2


class Case:
    """A pool whose pages hold each segment's KV in shuffled order, and the step's query rows."""

    def __init__(self, segments: list[tuple[int, int]], causal: bool, seed: int, spare_pages: int = 0) -> None:
        """segments: (query rows, kv_len) each; spare_pages: pages listed past the last one holding keys."""
        gen = torch.Generator(device="cuda").manual_seed(seed)
        listed = [-(-kv // PAGE) + spare_pages for _, kv in segments]
        num_pages = sum(listed) + 7
        shape = (num_pages, PAGE, KV_HEADS, DIM)
        self.k_cache = torch.randn(shape, generator=gen, device="cuda").to(BF16)
        self.v_cache = torch.randn(shape, generator=gen, device="cuda").to(BF16)
        pages = torch.randperm(num_pages, generator=gen, device="cuda")[: sum(listed)]
        rows = sum(n for n, _ in segments)
        self.q = torch.randn(rows, HEADS, DIM, generator=gen, device="cuda").to(BF16)
        self.meta = kernels.AttentionMetadata(
            list(itertools.accumulate((n for n, _ in segments), initial=0)),
            list(itertools.accumulate(listed, initial=0)),
            pages,
            [kv for _, kv in segments],
            PAGE,
            causal=causal,
        )

    def run(self) -> tuple[torch.Tensor, torch.Tensor]:
        return kernels.paged_attention(self.q, self.k_cache, self.v_cache, self.meta, SCALE)

    def own_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each query row's own K and V: its segment's last keys, row for row (where a causal segment's rows sit)."""
        meta, own = self.meta, []
        for cache in (self.k_cache, self.v_cache):
            keys = []
            for b in range(meta.num_segments):
                rows, kv = meta.qo_indptr[b + 1] - meta.qo_indptr[b], meta.kv_lens[b]
                pages = meta.page_indices[meta.page_indptr[b] : meta.page_indptr[b + 1]]
                keys.append(cache[pages].flatten(0, 1)[kv - rows : kv])
            own.append(torch.cat(keys))
        return own[0], own[1]

    def reference(self) -> tuple[torch.Tensor, torch.Tensor]:
        return reference_paged_attention(self.q.float(), self.k_cache.float(), self.v_cache.float(), self.meta, SCALE)

    def check(self) -> None:
        out, lse = self.run()
        ref, ref_lse = self.reference()
        assert out.dtype == BF16 and out.shape == self.q.shape
        assert rel_err(out, ref) < 1e-2
        assert_lse_close(lse, ref_lse)
        assert torch.equal(out[torch.isneginf(ref_lse[:, 0])], torch.zeros_like(out[torch.isneginf(ref_lse[:, 0])]))


def test_decode_rows_with_partly_filled_last_pages() -> None:
    Case([(1, kv) for kv in (1, 15, 16, 17, 100, 1000, 4097)], causal=True, seed=1).check()


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "non-causal"])
def test_prefill_chunks(causal: bool) -> None:
    Case([(5, 5), (7, 40), (16, 300), (33, 33), (2, 1030)], causal=causal, seed=2 + causal).check()


def test_mixed_step_with_empty_segments_and_spare_pages() -> None:
    # Decodes and chunks interleaved (rows not contiguous per kind), segments without keys (o = 0, lse = -inf),
    # a segment with keys but no queries, and page lists longer than the keys.
    segments = [(1, 50), (0, 30), (3, 0), (1, 0), (4, 64), (1, 17), (6, 211), (1, 1)]
    Case(segments, causal=True, seed=4, spare_pages=2).check()


@pytest.mark.parametrize(
    "segments",
    [[(100, 100), (1000, 1000)], [(1, 50), (40, 40), (6, 211), (33, 33), (1, 17), (5, 5)]],
    ids=["first-chunks", "beside-decodes-and-continued-chunks"],
)
def test_first_chunks_read_their_own_keys(segments: list[tuple[int, int]]) -> None:
    """Given the rows' own K, V, a prompt's first chunk (causal, as many keys as rows) reads its keys from them
    (ragged, FlashAttention-3 by TMA on Hopper) rather than from its pages: the same result, in place when those
    rows are contiguous and gathered when other segments sit between them."""
    case = Case(segments, causal=True, seed=6)
    out, lse = kernels.paged_attention(case.q, case.k_cache, case.v_cache, case.meta, SCALE, case.own_kv())
    ref, ref_lse = case.reference()
    assert rel_err(out, ref) < 1e-2
    assert_lse_close(lse, ref_lse)
    launches = [launch for plan in case.meta.backend_plans.values() for launch in plan.launches]
    assert any(launch.own_keys for launch in launches), "the first chunks read their own keys"


def test_lse_is_natural_log() -> None:
    case = Case([(1, 77)], causal=True, seed=5)
    _, lse = case.run()
    keys = case.k_cache[case.meta.page_indices].reshape(-1, KV_HEADS, DIM)[:77].double()
    queries = case.q.double().view(KV_HEADS, HEADS // KV_HEADS, DIM)
    scores = torch.einsum("hgd,khd->hgk", queries, keys) * SCALE
    expected = torch.logsumexp(scores, dim=-1).reshape(HEADS)
    assert (lse[0].double() - expected).abs().max().item() < 1e-2


@pytest.mark.parametrize("parts", [2, 3, 4, 8])
@pytest.mark.parametrize("query_rows", [1, 6], ids=["decode", "prefill-chunk"])
def test_split_into_parts_and_merged_equals_unsplit(parts: int, query_rows: int) -> None:
    kv_len = 1000  # 63 pages, the last one partly filled
    whole = Case([(query_rows, kv_len)], causal=True, seed=10 + parts)
    expected, expected_lse = whole.run()
    pages = whole.meta.page_indices
    # Cut at page boundaries; the chunk's own rows all sit in the last part, the only causal one.
    cuts = torch.linspace(0, len(pages) - 1, parts + 1).round().long().tolist()
    cuts[-1] = len(pages)
    partials = []
    for i, (first, last) in enumerate(itertools.pairwise(cuts)):
        part_len = min(last * PAGE, kv_len) - first * PAGE
        meta = kernels.AttentionMetadata(
            [0, query_rows], [0, last - first], pages[first:last], [part_len], PAGE, causal=i == parts - 1
        )
        partials.append(kernels.paged_attention(whole.q, whole.k_cache, whole.v_cache, meta, SCALE))
    merged, lse = kernels.merge_states(torch.stack([o for o, _ in partials]), torch.stack([s for _, s in partials]))
    assert merged.dtype == BF16
    assert rel_err(merged, expected) < 1e-2
    assert (lse - expected_lse).abs().max().item() < 1e-3


@pytest.mark.parametrize("parts", [2, 5])
def test_merge_with_empty_parts(parts: int) -> None:
    rows = 9
    outputs = torch.randn(parts, rows, HEADS, DIM, device="cuda").to(BF16)
    lses = torch.randn(parts, rows, HEADS, device="cuda") * 3
    lses[0, :4] = float("-inf")  # part 0 empty for some rows
    lses[:, 5] = float("-inf")  # every part empty for row 5
    outputs[:, 5] = 0  # an empty part's output is 0 by the interface
    merged, lse = kernels.merge_states(outputs, lses)
    ref, ref_lse = reference_merge_states(outputs.float(), lses)
    assert rel_err(merged, ref) < 1e-2
    assert_lse_close(lse, ref_lse)
    assert torch.equal(merged[5], torch.zeros_like(merged[5]))
    assert torch.isneginf(lse[5]).all()


def test_plans_are_reused_and_kept_apart() -> None:
    # Two metadata objects live in one step (say local and routed queries), used in turn by every layer.
    a = Case([(1, 300), (1, 20), (4, 90)], causal=True, seed=20)
    b = Case([(1, 33), (7, 500)], causal=False, seed=21)
    for case in (a, b, a, b):
        case.q = torch.randn_like(case.q, dtype=torch.float32).to(BF16)
        case.check()
    assert len(a.meta.backend_plans) == 1 and len(b.meta.backend_plans) == 1


def test_store_kv_skips_padding_rows() -> None:
    num_pages, rows = 12, 40
    k_cache = torch.randn(num_pages, PAGE, KV_HEADS, DIM, device="cuda").to(BF16)
    v_cache = torch.randn_like(k_cache)
    slots = torch.randperm(num_pages * PAGE, device="cuda")[:rows]
    slots[::7] = -1
    # k, v as strided views of one fused projection, as a model makes them.
    fused = torch.randn(rows, 2 * KV_HEADS + 3, DIM, device="cuda").to(BF16)
    k, v = fused[:, :KV_HEADS], fused[:, KV_HEADS : 2 * KV_HEADS]
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    reference_store_kv(expected_k, expected_v, k, v, slots)
    kernels.store_kv(k_cache, v_cache, k, v, slots)
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)


@pytest.mark.parametrize("counts", [[3, 0, 17, 1, 0, 64, 5, 0], [0, 0, 0, 40, 0, 0, 0, 0], [1] * 8])
def test_grouped_swiglu_matches_reference(counts: list[int]) -> None:
    hidden, width = 2048, 768  # Qwen3-30B-A3B expert shapes, fewer experts
    experts = len(counts)
    x = torch.randn(sum(counts), hidden, device="cuda").to(BF16)
    w_gate_up = (torch.randn(experts, 2 * width, hidden, device="cuda") * hidden**-0.5).to(BF16)
    w_down = (torch.randn(experts, hidden, width, device="cuda") * width**-0.5).to(BF16)
    out = kernels.grouped_swiglu(x, counts, w_gate_up, w_down)
    ref = reference_grouped_swiglu(x.float(), counts, w_gate_up.float(), w_down.float())
    assert out.dtype == BF16 and out.shape == x.shape
    assert rel_err(out, ref) < 1e-2


@pytest.mark.parametrize("skewed", [False, True], ids=["uniform", "one-long-row"])
def test_graph_decode_with_and_without_kv_split_match_the_reference(skewed: bool) -> None:
    """A graph's decode lets FlashInfer split a row's KV only where it can (GraphDecode.can_split); both ways are
    exact up to bf16 arithmetic, on the row counts either side of where the graphs stop splitting."""
    from nanocp.kernels.flashinfer_attention import GraphDecode

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    last_split = (2 * sms - 1) // KV_HEADS  # the most rows a graph still splits at
    assert GraphDecode.can_split(last_split, KV_HEADS, torch.device("cuda"))
    assert not GraphDecode.can_split(last_split + 1, KV_HEADS, torch.device("cuda"))
    plan_args = {"num_qo_heads": HEADS, "num_kv_heads": KV_HEADS, "head_dim": DIM, "page_size": PAGE,
                 "q_data_type": BF16, "kv_data_type": BF16, "sm_scale": SCALE}  # fmt: skip
    for rows in (last_split, last_split + 1):
        lens = [8192] + [300] * (rows - 1) if skewed else [1000] * rows
        case = Case([(1, kv) for kv in lens], causal=True, seed=rows)
        ref, ref_lse = case.reference()
        for split in (True, False):
            decode = GraphDecode(rows, case.k_cache.shape[0], plan_args, case.q.device, split_kv=split)
            decode.plan(case.meta)
            out, lse = decode.run(case.q, case.k_cache, case.v_cache)
            assert rel_err(out, ref) < 1e-2, (rows, split)
            assert_lse_close(lse, ref_lse)


@pytest.mark.parametrize("rows", [1, 2, 8])
def test_split_decode_matches_the_reference_with_padding_rows(rows: int) -> None:
    """The graph buckets' Triton decode (a few rows): contexts shorter than a split, one page, page ends, one long,
    pages listed past the keys; and padding rows, which attend one token and stay finite."""
    from nanocp.kernels.triton_decode import SplitDecode

    lens = [1, 15, 16, 17, 1000, 8192, 300, 64][: max(1, rows - 1)]
    case = Case([(1, kv) for kv in lens], causal=True, seed=rows, spare_pages=2)
    decode = SplitDecode(rows, case.k_cache.shape[0], {"num_kv_heads": KV_HEADS, "sm_scale": SCALE}, case.q.device)
    decode.plan(case.meta)
    q = torch.cat((case.q, case.q.new_ones(rows - len(lens), HEADS, DIM)))
    out, lse = decode.run(q, case.k_cache, case.v_cache)
    ref, ref_lse = case.reference()
    assert out.shape == q.shape and out.dtype == BF16
    assert rel_err(out[: len(lens)], ref) < 1e-2
    assert_lse_close(lse[: len(lens)], ref_lse)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert torch.equal(decode.output(q, case.k_cache, case.v_cache), out)


def test_split_decode_replays_equal_its_eager_calls() -> None:
    """Captured once, replanned for other contexts before each replay: a replay equals the eager call on its plan."""
    from nanocp.kernels.triton_decode import SplitDecode

    cases = [Case([(1, kv) for kv in lens], causal=True, seed=i) for i, lens in enumerate([[16, 3], [4097, 900]])]
    pages = max(c.k_cache.shape[0] for c in cases)
    k_cache = torch.zeros(pages, PAGE, KV_HEADS, DIM, dtype=BF16, device="cuda")
    v_cache, q = torch.zeros_like(k_cache), torch.zeros_like(cases[0].q)
    decode = SplitDecode(2, pages, {"num_kv_heads": KV_HEADS, "sm_scale": SCALE}, q.device)
    decode.plan(None)
    decode.run(q, k_cache, v_cache)  # compiles outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = decode.run(q, k_cache, v_cache)
    for case in cases:
        for mine, theirs in ((k_cache, case.k_cache), (v_cache, case.v_cache), (q, case.q)):
            mine.zero_()
            mine[: len(theirs)] = theirs
        decode.plan(case.meta)
        graph.replay()
        eager = decode.run(q, k_cache, v_cache)
        assert torch.equal(captured[0], eager[0]) and torch.equal(captured[1], eager[1])
        assert rel_err(eager[0], case.reference()[0]) < 1e-2
