"""Splitting a request's pages into parts, attending each part and merging the partial states equals attending all."""

from __future__ import annotations

import itertools

import pytest
import torch

from nanocp import kernels

PAGE, KV_HEADS, HEADS, DIM = 4, 2, 8, 16


def request_pages(kv_len: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A pool whose pages hold one request's KV in shuffled page order, and that order."""
    generator = torch.Generator().manual_seed(seed)
    num_pages = -(-kv_len // PAGE)
    k_cache = torch.randn(num_pages + 3, PAGE, KV_HEADS, DIM, generator=generator)
    v_cache = torch.randn(num_pages + 3, PAGE, KV_HEADS, DIM, generator=generator)
    pages = torch.randperm(num_pages + 3, generator=generator)[:num_pages]
    return k_cache, v_cache, pages


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pages: torch.Tensor, kv_len: int, causal: bool):
    meta = kernels.AttentionMetadata([0, q.shape[0]], [0, len(pages)], pages, [kv_len], PAGE, causal=causal)
    return kernels.paged_attention(q, k, v, meta, DIM**-0.5)


@pytest.mark.parametrize("parts", [2, 3, 4])
@pytest.mark.parametrize("query_rows", [1, 5], ids=["decode", "prefill-chunk"])
def test_split_pages_merged_equal_unsplit_attention(parts: int, query_rows: int) -> None:
    kv_len = 53  # the last page is partly filled
    k_cache, v_cache, pages = request_pages(kv_len, seed=parts)
    q = torch.randn(query_rows, HEADS, DIM, generator=torch.Generator().manual_seed(11))
    expected, expected_lse = attend(q, k_cache, v_cache, pages, kv_len, causal=True)

    # Cut at page boundaries; the chunk's own rows all sit in the last part, which is the only causal one.
    num_pages = len(pages)
    cuts = torch.linspace(0, num_pages - query_rows // PAGE - 1, parts + 1).round().long().tolist()
    cuts[-1] = num_pages
    partials = []
    for i, (first, last) in enumerate(itertools.pairwise(cuts)):
        part_len = min(last * PAGE, kv_len) - first * PAGE
        partials.append(attend(q, k_cache, v_cache, pages[first:last], part_len, causal=i == parts - 1))
    merged, merged_lse = kernels.merge_states(
        torch.stack([o for o, _ in partials]), torch.stack([lse for _, lse in partials])
    )
    torch.testing.assert_close(merged, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged_lse, expected_lse, atol=1e-5, rtol=1e-5)


def test_a_part_without_keys_merges_as_neutral() -> None:
    k_cache, v_cache, pages = request_pages(20, seed=3)
    q = torch.randn(1, HEADS, DIM)
    full = attend(q, k_cache, v_cache, pages, 20, causal=True)
    empty = attend(q, k_cache, v_cache, pages[:0], 0, causal=False)
    assert torch.isneginf(empty[1]).all()
    merged, lse = kernels.merge_states(torch.stack([full[0], empty[0]]), torch.stack([full[1], empty[1]]))
    torch.testing.assert_close(merged, full[0])
    torch.testing.assert_close(lse, full[1])


def test_all_parts_empty_merge_to_zero_output() -> None:
    outputs = torch.zeros(2, 3, HEADS, DIM)
    lses = torch.full((2, 3, HEADS), float("-inf"))
    merged, lse = kernels.merge_states(outputs, lses)
    assert torch.equal(merged, torch.zeros(3, HEADS, DIM))
    assert torch.isneginf(lse).all()
