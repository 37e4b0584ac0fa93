"""The Rényi filter: its RDP budget converts back to the (ε, δ) budget, the order it picks
is optimal for Gaussian costs, and what it admits is (ε, δ)-DP by dp-accounting's own RDP
accountant (an independent oracle)."""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest

from labeldp.errors import ConfigError
from labeldp.privacy.pate_accounting import rdp_to_epsilon
from labeldp.privacy.renyi_filter import RenyiFilter, best_order_for_linear_costs, rdp_budget


@pytest.mark.parametrize("epsilon, delta", [(0.5, 1e-5), (2.0, 1e-5), (8.0, 1e-6)])
def test_budget_converts_back_to_epsilon(epsilon, delta):
    order = best_order_for_linear_costs(epsilon, delta)
    budget = rdp_budget(epsilon, delta, order)
    assert rdp_to_epsilon(np.array([budget]), delta, np.array([order])) == pytest.approx(epsilon)


@pytest.mark.parametrize("epsilon, sigma", [(1.0, 10.0), (4.0, 25.0), (8.0, 10.0)])
def test_what_the_filter_admits_is_dp_by_dp_accounting(epsilon, sigma):
    delta = 1e-5
    order = best_order_for_linear_costs(epsilon, delta)
    f = RenyiFilter(epsilon, delta, order)
    cost = order / (2 * sigma**2)  # Gaussian mechanism, sensitivity 1
    steps = 0
    while f.admits(cost):
        f.spend(cost)
        steps += 1
    assert steps > 0

    def eps_of(n):
        acc = dp_accounting.rdp.RdpAccountant(orders=[1.01, *np.linspace(1.1, 200, 4000)])
        acc.compose(dp_accounting.GaussianDpEvent(sigma), n)
        return acc.get_epsilon(delta)

    assert eps_of(steps) <= epsilon * (1 + 1e-3)
    # the order is (nearly) optimal: a few more steps would exceed ε at every order
    assert eps_of(math.ceil(steps * 1.02) + 1) > epsilon
    with pytest.raises(RuntimeError, match="does not admit"):
        f.spend(cost)


def test_bad_arguments():
    with pytest.raises(ConfigError, match="epsilon must be"):
        RenyiFilter(0, 1e-5, 2)
    with pytest.raises(ConfigError, match="delta must be"):
        RenyiFilter(1, 1, 2)
    with pytest.raises(ConfigError, match="order must be"):
        RenyiFilter(1, 1e-5, 1)
