"""A Rényi privacy filter: adaptive composition stopped on public information only.

A filter lets a sequence of mechanisms run until a budget would be exceeded, where each
step's privacy cost may be chosen adaptively from the *released* outputs of the earlier
steps. Feldman & Zrnic (NeurIPS 2021, "Individual Privacy Accounting via a Rényi
Filter", Section 3) prove it for Rényi DP of one fixed order α: if the t-th step is
(α, ρ_t)-RDP given the earlier outputs, and the steps run only while Σ_t ρ_t ≤ B, the
whole interaction is (α, B)-RDP. Haney et al. (CCS 2023) show the same for concurrent
composition. The filter's decisions must depend on the released outputs alone; a
stopping rule that reads the private data (for example PATE's *data-dependent* cost, a
function of the raw votes) is not a filter and breaks the guarantee.

:class:`RenyiFilter` turns an (ε, δ) budget into an RDP budget B at one order α with the
conversion of Balle et al. (2020, Theorem 21), so that (α, B)-RDP implies (ε, δ)-DP:

    ε = B + log((α − 1)/α) − (log δ + log α)/(α − 1).

The order is fixed before any step runs (it may depend on public parameters only).
For costs proportional to α — Gaussian mechanisms, ρ(α) = α·c — the number of steps a
budget affords is B(α)/α · 1/c whatever the mix of steps, so the best order is the
maximizer of B(α)/α over a fine grid, which :func:`best_order_for_linear_costs` finds.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import ConfigError

#: Candidate orders for the single-order filter.
FILTER_ORDERS = np.concatenate([np.linspace(1.01, 10, 900), np.linspace(10.05, 1000, 19000)])


def rdp_budget(epsilon: float, delta: float, order: float) -> float:
    """The RDP budget B at ``order`` α > 1 such that (α, B)-RDP implies (ε, δ)-DP
    (Balle et al. 2020); negative when no RDP budget at that order reaches ε."""
    a = float(order)
    return epsilon - math.log((a - 1) / a) + (math.log(delta) + math.log(a)) / (a - 1)


def best_order_for_linear_costs(epsilon: float, delta: float) -> float:
    """The order α maximizing B(α)/α for an (ε, δ) budget: the best single-order filter
    for costs of the form ρ(α) = α·c (Gaussian mechanisms), whatever the steps."""
    a = FILTER_ORDERS
    budgets = epsilon - np.log((a - 1) / a) + (math.log(delta) + np.log(a)) / (a - 1)
    return float(a[int(np.argmax(budgets / a))])


class RenyiFilter:
    """A privacy filter at one Rényi order for an (ε, δ) budget.

    epsilon: the budget ε > 0 (finite). delta: δ in (0, 1). order: the Rényi order α > 1,
    fixed in advance from public parameters only.

    Before each step, :meth:`admits` says whether the step's RDP cost at α (a function of
    public information: the step's parameters and earlier *released* outputs) fits in
    what is left; :meth:`spend` records a step that ran. Whatever the sequence, the
    steps that ran are (α, B)-RDP and so (ε, δ)-DP."""

    def __init__(self, epsilon: float, delta: float, order: float) -> None:
        if not (math.isfinite(epsilon) and epsilon > 0):
            raise ConfigError(f"epsilon must be a finite number > 0, got {epsilon}")
        if not 0 < delta < 1:
            raise ConfigError(f"delta must be in (0, 1), got {delta}")
        if not (math.isfinite(order) and order > 1):
            raise ConfigError(f"order must be a finite Rényi order > 1, got {order}")
        self.epsilon, self.delta, self.order = float(epsilon), float(delta), float(order)
        self.budget = max(0.0, rdp_budget(self.epsilon, self.delta, self.order))
        self.spent = 0.0

    def admits(self, cost: float) -> bool:
        """Whether a step of RDP cost ``cost`` (at :attr:`order`) fits in the budget."""
        return self.spent + cost <= self.budget

    def spend(self, cost: float) -> None:
        """Records a step of RDP cost ``cost``; refuses one the budget does not admit."""
        if not self.admits(cost):
            raise RuntimeError("a privacy filter must not run a step it does not admit")
        self.spent += cost
