"""The memorization attack on canaries (Malek et al. 2021), with honest statistics.

Each canary's training label was replaced by a random wrong label y′. For each canary the
attacker compares the model's confidence c1 on y′ with its confidence c2 on another wrong
label y″ (one drawn at random per canary, so that guesses are independent trials), and
guesses "trained with y′" when c1 > c2, abstaining when max(c1, c2) < t. Under ε-label-DP
no such test is right with probability above e^ε/(1 + e^ε).

Unlike the original, the threshold t is chosen on one random half of the canaries (to
maximize the bound there) and the bound is measured on the other half only, with an exact
one-sided Clopper–Pearson bound.
"""

from __future__ import annotations

from typing import Any

import torch

from .stats import epsilon_lower_bound, epsilon_lower_bound_cap, epsilon_point_estimate

#: Abstention thresholds tried on the selection half (max(c1, c2) must reach t).
THRESHOLDS = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)


def _counts(c1: torch.Tensor, c2: torch.Tensor, threshold: float) -> tuple[int, int]:
    """(guesses, right guesses) at abstention threshold t; ties c1 = c2 count as wrong."""
    guess = torch.maximum(c1, c2) >= threshold
    if threshold == 0.0:
        guess = torch.ones_like(guess)
    return int(guess.sum()), int((guess & (c1 > c2)).sum())


def measured_canaries(num_canaries: int) -> int:
    """How many of ``num_canaries`` canaries the bound is measured on (the half not used
    to choose the threshold)."""
    return num_canaries - num_canaries // 2


def epsilon_lb_max(num_canaries: int, alpha: float = 0.05) -> float:
    """The largest ε_LB this attack can give with ``num_canaries`` canaries at level α: a
    perfect guess on every canary of the measurement half (5.11 for 1000 canaries at
    α = 0.05). A claimed ε at or above it cannot be refuted by the attack."""
    return epsilon_lower_bound_cap(measured_canaries(num_canaries), alpha)


def memorization_attack(
    probs: torch.Tensor,
    canary_labels: torch.Tensor,
    other_labels: torch.Tensor,
    generator: torch.Generator,
    alpha: float = 0.05,
) -> dict[str, Any]:
    """ε_LB of the memorization attack.

    probs: the model's softmax on the canaries, (m, K). canary_labels: y′ (m,), the labels
    the canaries were trained with. other_labels: y″ (m,), another wrong label per canary.
    generator: splits the canaries into the selection and measurement halves.
    """
    m = probs.shape[0]
    rows = torch.arange(m)
    c1 = probs[rows, canary_labels].double()
    c2 = probs[rows, other_labels].double()
    order = torch.randperm(m, generator=generator)
    select, measure = order[: m // 2], order[m // 2 :]

    def bound(part: torch.Tensor, t: float) -> float:
        guesses, correct = _counts(c1[part], c2[part], t)
        return epsilon_lower_bound(guesses, correct, alpha)

    threshold = max(THRESHOLDS, key=lambda t: (bound(select, t), -t)) if m >= 2 else 0.0
    guesses, correct = _counts(c1[measure], c2[measure], threshold)
    return {
        "epsilon_lb": epsilon_lower_bound(guesses, correct, alpha),
        "epsilon_lb_max": epsilon_lb_max(m, alpha),
        "epsilon_point": epsilon_point_estimate(guesses, correct),
        "guesses": guesses,
        "correct": correct,
        "threshold": threshold,
        "alpha": alpha,
        "canaries": m,
        "method": "threshold chosen on a random half of the canaries, bound measured on the "
        "other half (exact one-sided Clopper–Pearson)",
    }
