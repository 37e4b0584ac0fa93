"""Confident-GNMax: the empirical answer rate and label distribution match the analytic
probabilities (threshold noise on the maximum only), records and budget."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from labeldp.errors import ConfigError
from labeldp.mechanisms.confident_gnmax import ConfidentGNMax
from labeldp.privacy.pate_accounting import pate_epsilon


def test_answer_rate_is_that_of_noise_on_the_maximum_only():
    agg = ConfidentGNMax(threshold=12, sigma1=3, sigma2=1)
    votes = np.tile([10, 10, 10], (20_000, 1))
    out = agg.aggregate(votes, torch.Generator().manual_seed(0))
    p = agg.answer_probability(votes[0])
    assert p == pytest.approx(stats.norm.sf(2 / 3))
    assert stats.binomtest(int(out.answered.sum()), len(votes), p).pvalue > 1e-4
    # noise on every count, then the maximum, would answer far more often
    wrong = 1 - stats.norm.cdf(2 / 3) ** 3
    assert stats.binomtest(int(out.answered.sum()), len(votes), wrong).pvalue < 1e-10


@pytest.mark.parametrize("counts, sigma2", [([6, 5, 2], 2.0), ([30, 28, 25, 0], 4.0)])
def test_label_distribution_matches_the_analytic_probabilities(counts, sigma2):
    agg = ConfidentGNMax(threshold=-1e9, sigma1=1, sigma2=sigma2)  # answer everything
    votes = np.tile(counts, (20_000, 1))
    out = agg.aggregate(votes, torch.Generator().manual_seed(1))
    assert out.answered.all()
    probs = agg.label_probabilities(np.array(counts))
    observed = np.bincount(out.labels, minlength=len(counts))
    keep = probs * len(votes) >= 5
    f_obs = np.append(observed[keep], observed[~keep].sum())
    f_exp = np.append(probs[keep], probs[~keep].sum()) * len(votes)
    if f_exp[-1] == 0:
        f_obs, f_exp = f_obs[:-1], f_exp[:-1]
    assert stats.chisquare(f_obs, f_exp).pvalue > 1e-4


def test_label_probabilities_agree_with_monte_carlo_and_sum_to_one():
    agg = ConfidentGNMax(threshold=0, sigma1=1, sigma2=1.5)
    counts = np.array([4.0, 3.0, 3.0, 1.0])
    probs = agg.label_probabilities(counts)
    assert probs.sum() == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    draws = np.argmax(counts + 1.5 * rng.standard_normal((200_000, 4)), axis=1)
    np.testing.assert_allclose(np.bincount(draws, minlength=4) / 200_000, probs, atol=0.005)


def test_records_every_query_and_its_epsilon_is_the_accountants():
    rng = np.random.default_rng(3)
    votes = rng.multinomial(50, [0.6, 0.3, 0.1], size=300)
    agg = ConfidentGNMax(threshold=30, sigma1=8, sigma2=4)
    out = agg.aggregate(votes, torch.Generator().manual_seed(2))
    assert len(out.votes) == 300 and not out.stopped_by_budget
    assert ((out.labels >= 0) == out.answered).all() and 0 < out.answered.sum() < 300
    assert out.epsilon == pytest.approx(pate_epsilon(out.votes, out.answered, 30, 8, 4, 1e-5))


def test_budget_stops_before_it_is_exceeded():
    rng = np.random.default_rng(4)
    votes = rng.multinomial(50, [0.6, 0.3, 0.1], size=300)
    agg = ConfidentGNMax(threshold=30, sigma1=8, sigma2=4)
    free = agg.aggregate(votes, torch.Generator().manual_seed(5))
    budget = free.epsilon / 3
    capped = agg.aggregate(votes, torch.Generator().manual_seed(5), budget=budget)
    assert capped.stopped_by_budget and capped.epsilon <= budget
    assert capped.answered.sum() < free.answered.sum()
    # the same noise: the capped run is a prefix of the free one
    n = len(capped.votes)
    np.testing.assert_array_equal(capped.labels[: n - 1], free.labels[: n - 1])
    assert (
        pate_epsilon(free.votes[: n + 1], free.answered[: n + 1], 30, 8, 4, 1e-5) > budget
        or free.answered[n - 1] != capped.answered[n - 1]
    )


def test_bad_arguments():
    with pytest.raises(ConfigError, match="sigma1 must be a finite number > 0"):
        ConfidentGNMax(10, 0, 1)
    agg = ConfidentGNMax(10, 1, 1)
    with pytest.raises(ConfigError, match="votes must be"):
        agg.aggregate(np.ones(4))
    with pytest.raises(ConfigError, match="budget must be"):
        agg.aggregate(np.ones((2, 3)), budget=-1)
    with pytest.raises(ValueError, match="generator must be None"):
        ConfidentGNMax(10, 1, 1, secure=True).aggregate(np.ones((2, 3)), torch.Generator())
