"""The batched sampler: greedy rows take the argmax, filters keep what top-k and top-p allow, draws follow the
distribution, a request's draws depend only on its seed and token index (not on the batch it shares), and no
accepted setting or non-finite logit makes it raise."""

from __future__ import annotations

import torch

from nanocp.limits import MAX_TEMPERATURE, MIN_TEMPERATURE
from nanocp.worker.model_runner import NON_FINITE, reference_filter, sample, uniform
from nanocp.worker.planner import SamplingRows
from nanocp.worker.request import SamplingParams


def rows(params: list[SamplingParams], seeds: list[int], draws: list[int]) -> SamplingRows:
    return SamplingRows(params, seeds, draws)


def test_greedy_rows_take_the_argmax_beside_sampled_rows() -> None:
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0), SamplingParams(temperature=0.0)] * 2
    tokens = sample(logits, rows(params[:4], [1, 2, 3, 4], [0, 0, 0, 0]))
    assert tokens[0] == logits[0].argmax() and tokens[2] == logits[2].argmax()
    assert sample(logits, rows([SamplingParams(temperature=0.0)] * 4, [0] * 4, [0] * 4)).tolist() == (
        logits.argmax(dim=-1).tolist()
    )


def test_a_rows_draw_depends_on_its_seed_and_index_only() -> None:
    logits = torch.randn(1, 1000, generator=torch.Generator().manual_seed(1))
    hot = SamplingParams(temperature=2.0)
    alone = [sample(logits, rows([hot], [42], [i])).item() for i in range(8)]
    others = torch.randn(3, 1000, generator=torch.Generator().manual_seed(2))
    batched = [
        sample(torch.cat((others, logits)), rows([hot] * 4, [7, 8, 9, 42], [i, 5, 2, i]))[3].item() for i in range(8)
    ]
    assert alone == batched, "the same seed and index draw the same token in any batch"
    assert len(set(alone)) > 1, "successive draws of one request differ"
    assert uniform([42], [3], torch.device("cpu")).item() != uniform([43], [3], torch.device("cpu")).item()


def test_draws_follow_the_distribution() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()[None].expand(4000, -1)
    tokens = sample(logits, rows([SamplingParams(temperature=1.0)] * 4000, list(range(4000)), [0] * 4000))
    frequencies = torch.bincount(tokens, minlength=4).float() / 4000
    # 4000 fixed draws: the binomial standard error is under 0.008, so 0.04 is five of them.
    assert torch.allclose(frequencies, probs, atol=0.04), frequencies


def test_uniform_numbers_are_spread_over_zero_to_one() -> None:
    u = uniform(list(range(20000)), [0] * 20000, torch.device("cpu"))
    assert u.min().item() >= 0.0 and u.max().item() < 1.0
    assert abs(u.mean().item() - 0.5) < 0.01
    assert torch.histc(u.float(), bins=10, min=0, max=1).min().item() > 1800  # 2000 expected per bin


def test_filters_keep_top_k_then_the_top_p_mass_renormalised() -> None:
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4]])
    filtered = reference_filter(probs, torch.tensor([2, 4, 4]), torch.tensor([1.0, 0.65, 0.5]))
    torch.testing.assert_close(filtered[0], torch.tensor([4 / 7, 3 / 7, 0.0, 0.0]))
    torch.testing.assert_close(filtered[1], torch.tensor([4 / 7, 3 / 7, 0.0, 0.0]), msg="0.4 < 0.65: 0.3 stays")
    torch.testing.assert_close(filtered[2], torch.tensor([0.0, 0.0, 3 / 7, 4 / 7]))


def test_seeds_beyond_64_bits_and_negative_seeds_are_accepted() -> None:
    logits = torch.randn(2, 10)
    tokens = sample(logits, rows([SamplingParams(temperature=1.0)] * 2, [2**70 + 3, -5], [0, 1]))
    assert tokens.shape == (2,)


def test_a_row_with_non_finite_logits_is_marked_alone_and_the_others_sample() -> None:
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(3))
    clean = sample(logits, rows([SamplingParams(temperature=0.7)] * 4, [1, 2, 3, 4], [0] * 4))
    logits[1, 7] = float("nan")
    logits[3, 0] = float("inf")
    for params in (SamplingParams(temperature=0.7), SamplingParams(temperature=0.0)):
        tokens = sample(logits, rows([params] * 4, [1, 2, 3, 4], [0] * 4))
        assert tokens[1] == NON_FINITE and tokens[3] == NON_FINITE
        expected = clean if not params.greedy else logits.nan_to_num().argmax(dim=-1)
        assert tokens[[0, 2]].tolist() == expected[[0, 2]].tolist()


def test_every_accepted_extreme_samples_a_token_of_the_vocabulary() -> None:
    """The ends of the ranges nanocp.limits accepts, with logits from flat to as far apart as float32 goes."""
    vocab = 64
    # Ends so far apart that their difference overflows float32 to -inf.
    spread = torch.cat((torch.tensor([-3e38]), torch.linspace(-1e38, 1e38, vocab - 2), torch.tensor([3e38])))
    logits = torch.stack([torch.zeros(vocab), spread, spread.flip(0), torch.randn(vocab) * 1e4])
    extremes = [
        SamplingParams(temperature=MIN_TEMPERATURE),
        SamplingParams(temperature=MAX_TEMPERATURE),
        SamplingParams(temperature=1.0, top_p=torch.finfo(torch.float32).smallest_normal / 2),
        SamplingParams(temperature=1.0, top_k=2**31 - 1, top_p=1.0),
        SamplingParams(temperature=MIN_TEMPERATURE, top_k=1, top_p=1e-30),
    ]
    for params in extremes:
        tokens = sample(logits, rows([params] * 4, [2**64 - 1, 0, -(2**63), 7], [0, 2**31, 5, 1]))
        assert ((tokens >= 0) & (tokens < vocab)).all(), (params, tokens)
        assert tokens[1] == vocab - 1 and tokens[2] == 0, "a spread that wide leaves one token"
