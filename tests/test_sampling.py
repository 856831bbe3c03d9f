"""The next-token rules, against distributions worked out by hand."""

from __future__ import annotations

import math
import re

import pytest
import torch

from megatron_sffn.inference.sampling import SamplingParams, choose_next

PROBS = torch.tensor([0.1, 0.4, 0.2, 0.3])  # ranks: 1, 3, 2, 0


def _draws(params: SamplingParams, count: int = 4000) -> torch.Tensor:
    logits = PROBS.log().expand(count, -1)
    return choose_next(logits, params, torch.Generator().manual_seed(params.seed))


def test_greedy_is_argmax_whatever_the_seed():
    assert _draws(SamplingParams(max_new_tokens=1, seed=3), 5).tolist() == [1] * 5


def test_top_k_keeps_the_k_most_likely_in_proportion():
    draws = _draws(SamplingParams(max_new_tokens=1, temperature=1.0, top_k=2))
    assert set(draws.tolist()) == {1, 3}
    share = (draws == 1).float().mean().item()
    assert abs(share - 0.4 / 0.7) < 0.03


def test_top_p_keeps_the_smallest_set_reaching_p():
    # sorted 0.4, 0.3, 0.2, 0.1: mass before each is 0, 0.4, 0.7, 0.9; p=0.6 keeps the first two
    draws = _draws(SamplingParams(max_new_tokens=1, temperature=1.0, top_p=0.6))
    assert set(draws.tolist()) == {1, 3}
    assert set(_draws(SamplingParams(max_new_tokens=1, temperature=1.0, top_p=0.01)).tolist()) == {1}


def test_temperature_sharpens_the_distribution():
    draws = _draws(SamplingParams(max_new_tokens=1, temperature=0.5))
    expected = PROBS**2 / (PROBS**2).sum()  # p^(1/T), renormalised
    for token in range(4):
        assert math.isclose((draws == token).float().mean().item(), expected[token].item(), abs_tol=0.03)


def test_same_seed_same_draws():
    params = SamplingParams(max_new_tokens=1, temperature=1.0, seed=5)
    assert torch.equal(_draws(params, 50), _draws(params, 50))


@pytest.mark.parametrize(
    "options, message",
    [
        ({"temperature": -1.0}, "temperature=-1.0 must be >= 0"),
        ({"top_k": -2}, "top_k=-2 must be >= 0"),
        ({"top_p": 0.0}, "top_p=0.0 must be in (0, 1]"),
        ({"top_p": 1.01}, "top_p=1.01 must be in (0, 1]"),
        ({"max_new_tokens": 0}, "max_new_tokens=0 must be at least 1"),
    ],
)
def test_bad_settings_name_the_value(options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        SamplingParams(**{"max_new_tokens": 4, **options})
