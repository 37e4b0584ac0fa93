"""Confident-GNMax: the empirical answer rate and label distribution match the analytic
probabilities (threshold noise on the maximum only), records and budget."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from labeldp.errors import ConfigError
from labeldp.mechanisms.confident_gnmax import ConfidentGNMax
from labeldp.mechanisms.randomness import standard_normal
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
    assert out.epsilon_data_dependent == pytest.approx(
        pate_epsilon(out.votes, out.answered, 30, 8, 4, 1e-5)
    )
    # without a budget the guarantee is that of answering all 300, fixed in advance
    worst = pate_epsilon(votes, np.ones(300, bool), 30, 8, 4, 1e-5, data_dependent=False)
    assert out.epsilon == pytest.approx(worst, rel=1e-6)


def test_budget_stops_before_it_is_exceeded():
    rng = np.random.default_rng(4)
    votes = rng.multinomial(50, [0.6, 0.3, 0.1], size=300)
    agg = ConfidentGNMax(threshold=30, sigma1=8, sigma2=4)
    free = agg.aggregate(votes, torch.Generator().manual_seed(5))
    budget = 2.0
    capped = agg.aggregate(votes, torch.Generator().manual_seed(5), budget=budget)
    assert capped.stopped_by_budget and capped.epsilon == budget
    assert 0 < capped.answered.sum() < free.answered.sum()
    # the same noise: the capped run is a prefix of the free one
    n = len(capped.votes)
    np.testing.assert_array_equal(capped.labels[: n - 1], free.labels[: n - 1])
    # the data-independent ε of what was released stays within the budget at every
    # order-minimizing conversion (an independent computation of the same bound)
    spent = pate_epsilon(
        capped.votes, capped.answered, 30, 8, 4, 1e-5, data_dependent=False
    )
    assert spent <= budget
    # one more answer would not have fitted in the filter at its order
    order = capped.filter_order
    check, answer = order / (2 * 8**2), order / 4**2
    used = n * check + capped.answered.sum() * answer
    from labeldp.privacy.renyi_filter import rdp_budget

    assert used <= rdp_budget(budget, 1e-5, order) * (1 + 1e-9)
    assert used + check + answer > rdp_budget(budget, 1e-5, order)


def test_the_stop_depends_only_on_released_outcomes_not_on_the_votes():
    """Neighbouring vote histograms (one teacher moves its vote): with the same noise,
    the filter stops at the same place whenever the released answered-flags agree; the
    data-dependent rule answered [100, 0, …] 77 % of the time and [99, 1, …] never."""
    agg = ConfidentGNMax(threshold=70, sigma1=40, sigma2=10)
    first = np.array([[100] + [0] * 9])
    second = np.array([[99, 1] + [0] * 8])
    for budget in (0.326, 2.0):
        rates = []
        for votes in (first, second):
            answered = [
                agg.aggregate(votes, torch.Generator().manual_seed(s), budget=budget).answered
                for s in range(2000)
            ]
            rates.append(float(np.mean([a.any() for a in answered])))
        if budget == 0.326:  # no answer fits at σ₂ = 10: neither histogram is answered
            assert rates == [0.0, 0.0]
        else:  # both answered as often as the threshold noise says (0.773 and 0.766)
            for rate, top in zip(rates, (100, 99), strict=True):
                p = stats.norm.sf((70 - top) / 40)
                assert stats.binomtest(round(rate * 2000), 2000, p).pvalue > 1e-4
    # a pool of neighbouring queries: the stop index is a function of the released
    # pass/fail outcomes alone, replayed here without the votes
    rng = np.random.default_rng(0)
    votes = rng.multinomial(100, [0.7, 0.1, 0.1, 0.1], size=400)
    moved = votes.copy()
    moved[:, 0] -= 1
    moved[:, 1] += 1
    for seed in range(10):
        for v in (votes, moved):
            out = agg.aggregate(v, torch.Generator().manual_seed(seed), budget=3.0)
            noise = standard_normal((len(v),), generator=torch.Generator().manual_seed(seed))
            passed = v.max(axis=1) + 40 * noise.numpy() >= 70
            assert len(out.votes) == _replayed_stop(passed, 3.0, 1e-5, 40, 10)
            assert out.epsilon == 3.0


def _replayed_stop(passed, budget, delta, sigma1, sigma2):
    from labeldp.privacy.renyi_filter import best_order_for_linear_costs, rdp_budget

    order = best_order_for_linear_costs(budget, delta)
    left = rdp_budget(budget, delta, order)
    for i, ok in enumerate(passed):
        left -= order / (2 * sigma1**2)
        if left < 0:
            return i
        if ok:
            left -= order / sigma2**2
            if left < 0:
                return i + 1
    return len(passed)


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
