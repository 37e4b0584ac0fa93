"""The smooth-sensitivity release of PATE's data-dependent cost against brute force:
local sensitivities at every distance over all histograms of a few teachers (computed
with the accountant's own functions), the β-smoothness of SS over every neighbouring
pair, and the GNSS theorem's RDP against numerically integrated Rényi divergences."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import integrate
from scipy.stats import norm

from labeldp.errors import ConfigError
from labeldp.privacy.pate_accounting import (
    log_p_answered,
    log_q_gnmax,
    rdp_data_dependent,
)
from labeldp.privacy.pate_smooth_sensitivity import (
    check_monotone_gnmax,
    gnmax_local_sensitivities,
    gnss_rdp,
    gnss_sigma,
    release,
    smooth_sensitivity,
    threshold_local_sensitivities,
)


def _histograms(teachers: int, classes: int) -> list[tuple[int, ...]]:
    return [h for h in itertools.product(range(teachers + 1), repeat=classes) if sum(h) == teachers]


def _neighbours(h: tuple[int, ...]):
    for i, j in itertools.permutations(range(len(h)), 2):
        if h[i] > 0:
            m = list(h)
            m[i] -= 1
            m[j] += 1
            yield tuple(m)


def _brute_force(teachers, classes, rdp):
    """Exact LS^(d)(h) = max over m within d moves of h of max over neighbours m′ of
    |rdp(m) − rdp(m′)|, for every histogram h and d = 0..N."""
    hists = _histograms(teachers, classes)
    value = {h: rdp(h) for h in hists}
    ls = {h: max(abs(value[h] - value[m]) for m in _neighbours(h)) for h in hists}
    out = {}
    for h in hists:
        seen, frontier, best = {h}, [h], [ls[h]]
        for _ in range(teachers):
            nxt = []
            for m in frontier:
                for n in _neighbours(m):
                    if n not in seen:
                        seen.add(n)
                        nxt.append(n)
            frontier = nxt
            best.append(max([best[-1]] + [ls[m] for m in frontier]))
        out[h] = np.array(best)
    return out


@pytest.mark.parametrize("teachers, sigma, order", [(10, 0.5, 1.5), (24, 2.0, 2.0), (16, 1.0, 3.0)])
def test_gnmax_local_sensitivities_bound_the_brute_force_ones(teachers, sigma, order):
    def rdp(h):
        return rdp_data_dependent(log_q_gnmax(np.array(h), sigma), sigma, np.array([order]))[0]

    exact = _brute_force(teachers, 3, rdp)
    informative = 0
    for h, truth in exact.items():
        bound = gnmax_local_sensitivities(np.array([h]), teachers, sigma, order)[0]
        assert np.all(bound >= truth - 1e-12), (h, bound, truth)
        informative += bound[0] < order / sigma**2 * 0.5
    assert informative > 0  # the bound is not just the data-independent cap everywhere


@pytest.mark.parametrize("teachers, threshold, sigma1, order", [(10, 6, 1.5, 2.0), (20, 14, 3, 4)])
def test_threshold_local_sensitivities_equal_the_brute_force_ones(
    teachers, threshold, sigma1, order
):
    def rdp(h):
        log_q = min(log_p_answered(np.array(h), threshold, sigma1))
        return rdp_data_dependent(log_q, math.sqrt(2) * sigma1, np.array([order]))[0]

    exact = _brute_force(teachers, 3, rdp)
    for h, truth in exact.items():
        bound = threshold_local_sensitivities(np.array([h]), teachers, threshold, sigma1, order)[0]
        assert np.all(bound >= truth - 1e-12), (h, bound, truth)


def test_the_smooth_sensitivity_is_beta_smooth_over_every_neighbouring_pair():
    teachers, sigma, order, beta = 16, 1.0, 3.0, 0.1

    def ss(h):
        local = gnmax_local_sensitivities(np.array([h]), teachers, sigma, order)[0]
        local = local + threshold_local_sensitivities(np.array([h]), teachers, 10, 2.0, order)[0]
        return smooth_sensitivity(local, beta)

    for h in _histograms(teachers, 3):
        for m in _neighbours(h):
            assert ss(h) <= math.exp(beta) * ss(m) * (1 + 1e-12)


def _renyi_divergence(mu1, s1, mu2, s2, order):
    def integrand(x):
        return math.exp(order * norm.logpdf(x, mu1, s1) + (1 - order) * norm.logpdf(x, mu2, s2))

    lo, hi = min(mu1, mu2) - 40 * max(s1, s2), max(mu1, mu2) + 40 * max(s1, s2)
    value = integrate.quad(integrand, lo, hi, limit=400, epsabs=0, epsrel=1e-10)[0]
    return math.log(value) / (order - 1)


@pytest.mark.parametrize("beta, sigma_s, order", [(0.05, 4.0, 5.0), (0.02, 10.0, 10.0)])
def test_gnss_rdp_bounds_the_renyi_divergence_of_the_release(beta, sigma_s, order):
    """f(D) + S·σ·Z against f(D′) + S′·σ·Z with |f(D) − f(D′)| ≤ min(S, S′) and
    S′/S in [e^{−β}, e^β] (what a β-smooth upper bound guarantees)."""
    bound = gnss_rdp(beta, sigma_s, order)
    worst = 0.0
    for ratio in np.exp(np.linspace(-beta, beta, 7)):
        for gap in np.linspace(0, min(1, ratio), 5):
            for a, b in (((0.0, 1.0), (gap, ratio)), ((gap, ratio), (0.0, 1.0))):
                d = _renyi_divergence(a[0], a[1] * sigma_s, b[0], b[1] * sigma_s, order)
                worst = max(worst, d)
    assert worst <= bound
    assert worst > 0.3 * bound  # and it is not vacuous


def test_release_parameters_and_refusals():
    sigma_s = gnss_sigma(0.02, 10.0, 0.5)
    assert gnss_rdp(0.02, sigma_s, 10.0) == pytest.approx(0.5)
    with pytest.raises(ConfigError, match="needs more than"):
        gnss_sigma(0.02, 10.0, 0.01)
    with pytest.raises(ConfigError, match="1 < order < 1/"):
        gnss_rdp(0.1, 1.0, 6.0)
    check_monotone_gnmax(10.0, 10.0, 10)  # the setting of the Fashion-MNIST sweeps
    votes = np.array([[90, 5, 5], [40, 35, 25]])
    out = release(votes, np.array([True, False]), 100, 70, 40, 10, 10.0, 0.02, sigma_s, 1e-5, 0.0)
    assert out.release_rdp == pytest.approx(0.5) and out.noise_std >= 0
    assert out.noise_std == pytest.approx(out.smooth_sensitivity * sigma_s)
