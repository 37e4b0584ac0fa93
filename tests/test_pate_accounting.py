"""PATE's data-dependent accountant against direct numerical evaluation of the Rényi
divergence (two classes, few teachers), the data-independent bound, and dp-accounting's
RDP → (ε, δ) conversion."""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest
from scipy.special import logsumexp
from scipy.stats import norm

from labeldp.errors import ConfigError
from labeldp.privacy.pate_accounting import (
    ORDERS,
    log_p_answered,
    log_q_gnmax,
    pate_epsilon,
    pate_rdp,
    rdp_data_dependent,
    rdp_to_epsilon,
)


def _renyi(log_p: np.ndarray, log_q: np.ndarray, order: float) -> float:
    """D_λ(P ‖ Q) of two distributions on a finite set given as log-probabilities,
    directly: log Σ_o P(o)^λ Q(o)^{1−λ} / (λ − 1)."""
    return float(logsumexp(order * log_p + (1 - order) * log_q) / (order - 1))


def _bernoulli(z: float) -> np.ndarray:
    """log of (Φ(z), 1 − Φ(z)), each accurate in the tails."""
    return np.array([norm.logcdf(z), norm.logsf(z)])


def _gnmax_two_classes(n0: int, n1: int, sigma2: float) -> np.ndarray:
    return _bernoulli((n0 - n1) / (math.sqrt(2) * sigma2))  # Pr[n0 + Z0 > n1 + Z1]


CASES = [(n, sigma, lam) for n in (8, 12, 20) for sigma in (1.0, 1.5, 2.5) for lam in (2, 4, 8)]


@pytest.mark.parametrize("teachers, sigma2, order", CASES)
def test_gnmax_bound_holds_against_the_direct_divergence_for_two_classes(teachers, sigma2, order):
    active = 0
    for n0 in range(teachers // 2 + 1, teachers + 1):
        votes = np.array([n0, teachers - n0])
        bound = rdp_data_dependent(log_q_gnmax(votes, sigma2), sigma2, [order])[0]
        assert bound <= order / sigma2**2 + 1e-12
        active += bound < order / sigma2**2 - 1e-9
        here = _gnmax_two_classes(n0, teachers - n0, sigma2)
        for moved in (-1, 1):  # one teacher's vote moves to the other class
            m0 = n0 + moved
            if not 0 <= m0 <= teachers:
                continue
            there = _gnmax_two_classes(m0, teachers - m0, sigma2)
            assert _renyi(here, there, order) <= bound + 1e-9
    if sigma2 <= 1.5 and order <= 4:
        assert active  # the data-dependent branch was exercised, not only the fallback


@pytest.mark.parametrize("sigma1", [1.0, 2.0, 4.0])
@pytest.mark.parametrize("order", [2, 5])
def test_threshold_bound_holds_against_the_direct_divergence(sigma1, order):
    threshold = 10.0
    for top in range(0, 25):
        log_p, log_1mp = log_p_answered(np.array([top, 0]), threshold, sigma1)
        bound = rdp_data_dependent(min(log_p, log_1mp), math.sqrt(2) * sigma1, [order])[0]
        assert bound <= order / (2 * sigma1**2) + 1e-12
        here = np.array([log_p, log_1mp])
        for moved in (-1, 1):  # the maximum moves by at most one vote
            there = _bernoulli((top + moved - threshold) / sigma1)
            assert _renyi(here, there, order) <= bound + 1e-9


def test_data_dependent_is_at_most_data_independent_and_gains_on_consensus():
    rng = np.random.default_rng(0)
    votes = rng.multinomial(250, [0.9, 0.05, 0.03, 0.02], size=40)
    answered = rng.random(40) < 0.7
    for sigma1, sigma2, threshold in [(150, 40, 200), (50, 20, 150), (10, 5, 100)]:
        dep = pate_rdp(votes, answered, threshold, sigma1, sigma2)
        ind = pate_rdp(votes, answered, threshold, sigma1, sigma2, data_dependent=False)
        assert np.all(dep <= ind + 1e-12)
        e_dep = pate_epsilon(votes, answered, threshold, sigma1, sigma2, 1e-5)
        e_ind = pate_epsilon(votes, answered, threshold, sigma1, sigma2, 1e-5, False)
        assert e_dep <= e_ind
    # strong consensus, moderate noise: the data-dependent ε is far smaller
    assert pate_epsilon(votes, answered, 200, 150, 40, 1e-5) < 0.5 * pate_epsilon(
        votes, answered, 200, 150, 40, 1e-5, data_dependent=False
    )


def test_epsilon_decreases_with_noise_data_independently_but_not_always_dependently():
    rng = np.random.default_rng(1)
    votes = rng.multinomial(250, [0.8, 0.1, 0.1], size=30)
    answered = np.ones(30, dtype=bool)

    def eps(sigma1, sigma2, dependent):
        return pate_epsilon(votes, answered, 200, sigma1, sigma2, 1e-5, dependent)

    by_sigma2 = [eps(150, s, False) for s in (20, 40, 80, 160)]
    by_sigma1 = [eps(s, 40, False) for s in (50, 100, 200, 400)]
    assert by_sigma2 == sorted(by_sigma2, reverse=True)
    assert by_sigma1 == sorted(by_sigma1, reverse=True)
    assert [eps(s, 40, True) for s in (50, 100, 200)] == sorted(
        [eps(s, 40, True) for s in (50, 100, 200)], reverse=True
    )
    # Less argmax noise can *lower* the data-dependent ε: with σ₂ = 20 the plurality wins
    # almost surely, so q is tiny (a known property of the analysis, not a bug).
    assert eps(150, 20, True) < eps(150, 40, True)


def test_fewer_answers_cost_less():
    rng = np.random.default_rng(2)
    votes = rng.multinomial(250, [0.7, 0.2, 0.1], size=30)
    some = np.arange(30) < 10
    every = np.ones(30, dtype=bool)
    assert pate_epsilon(votes, some, 200, 150, 40, 1e-5) < pate_epsilon(
        votes, every, 200, 150, 40, 1e-5
    )


@pytest.mark.parametrize("sigma, steps", [(1.0, 1), (3.0, 50), (20.0, 1000)])
def test_rdp_conversion_equals_dp_accounting(sigma, steps):
    accountant = dp_accounting.rdp.RdpAccountant(orders=list(ORDERS))
    accountant.compose(dp_accounting.GaussianDpEvent(sigma), steps)
    ours = rdp_to_epsilon(steps * ORDERS / (2 * sigma**2), 1e-5)
    assert ours == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)
    classic = np.min(steps * ORDERS / (2 * sigma**2) + math.log(1e5) / (ORDERS - 1))
    assert ours <= classic


def test_plain_gnmax_without_threshold_pays_only_for_answers():
    votes = np.array([[30, 2, 1], [20, 10, 3]])
    with_threshold = pate_rdp(votes, [True, True], 25, 10, 5, data_dependent=False)
    without = pate_rdp(votes, [True, True], None, 10, 5, data_dependent=False)
    np.testing.assert_allclose(without, 2 * ORDERS / 25)
    np.testing.assert_allclose(with_threshold - without, 2 * ORDERS / 200)


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"votes": np.ones(3)}, "votes must be a (queries, classes ≥ 2) array"),
        ({"votes": -np.ones((2, 3))}, "votes must be finite counts ≥ 0"),
        ({"answered": np.ones(5, dtype=bool)}, "answered must have one flag per query"),
        ({"sigma1": 0.0}, "sigma1 must be a finite number > 0"),
        ({"sigma2": float("nan")}, "sigma2 must be a finite number > 0"),
        ({"delta": 1.0}, "delta must be in (0, 1)"),
    ],
)
def test_bad_arguments_name_the_parameter(kwargs, fragment):
    args = {
        "votes": np.ones((2, 3)),
        "answered": np.ones(2, dtype=bool),
        "threshold": 1.0,
        "sigma1": 1.0,
        "sigma2": 1.0,
        "delta": 1e-5,
    } | kwargs
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        pate_epsilon(**args)
