"""One-run audit (Steinke, Nasr, Jagielski, NeurIPS 2023).

Each audit canary's training label is a fair coin between two candidate labels (a, b).
After one training run the attacker scores each canary (confidence on a minus confidence
on b), guesses the sign on the r canaries with the largest |score| and abstains on the
rest. Under pure ε-DP the number of right guesses is dominated by
Binomial(r, e^ε/(1+e^ε)); ε_LB at level α follows from the binomial test. Several r are
tried, with a Bonferroni correction over them.
"""

from __future__ import annotations

from typing import Any

import torch

from .stats import epsilon_lower_bound, epsilon_lower_bound_cap, epsilon_point_estimate

__all__ = ["audit", "epsilon_lb_max", "epsilon_lower_bound", "guess_counts", "guess_sizes"]

#: Shares of the canaries the attacker guesses on (the most confident first).
GUESS_SHARES = (1.0, 0.5, 0.25, 0.1, 0.05)


def guess_counts(scores: torch.Tensor, truth_is_a: torch.Tensor, num_guesses: int) -> int:
    """Right guesses among the ``num_guesses`` canaries with the largest |score|, guessing
    "a" where score > 0 and "b" where score < 0 (a score of exactly 0 counts as wrong)."""
    order = torch.argsort(scores.abs(), descending=True, stable=True)[:num_guesses]
    s, truth = scores[order], truth_is_a[order]
    return int(((s > 0) & truth).sum() + ((s < 0) & ~truth).sum())


def guess_sizes(num_canaries: int) -> list[int]:
    """The guess counts r tried on ``num_canaries`` canaries, largest first (the
    Bonferroni correction is over these)."""
    if not num_canaries:
        return []
    return sorted({max(1, round(share * num_canaries)) for share in GUESS_SHARES}, reverse=True)


def epsilon_lb_max(num_canaries: int, alpha: float = 0.05) -> float:
    """The largest ε_LB the audit can give with ``num_canaries`` canaries at overall level
    α: every guess right at the largest r, at the Bonferroni level α / (number of r)
    (5.38 for 1000 canaries at α = 0.05). A claimed ε at or above it cannot be refuted by
    the audit."""
    sizes = guess_sizes(num_canaries)
    level = alpha / max(len(sizes), 1)
    return max((epsilon_lower_bound_cap(r, level) for r in sizes), default=0.0)


def audit(
    confidence_a: torch.Tensor,
    confidence_b: torch.Tensor,
    truth_is_a: torch.Tensor,
    alpha: float = 0.05,
) -> dict[str, Any]:
    """ε_LB of the one-run audit.

    confidence_a, confidence_b: the model's confidence in each canary's candidates a and
    b, (m,): probabilities or log-probabilities (the score is their difference).
    truth_is_a: bool (m,), whether the coin chose a. alpha: overall level.
    Returns the bound, the r that gave it, its counts and the per-r table.
    """
    scores = (confidence_a - confidence_b).double()
    m = len(scores)
    sizes = guess_sizes(m)
    level = alpha / max(len(sizes), 1)
    table = []
    for r in sizes:
        v = guess_counts(scores, truth_is_a, r)
        table.append({"guesses": r, "correct": v, "epsilon_lb": epsilon_lower_bound(r, v, level)})
    best = max(
        table,
        key=lambda row: row["epsilon_lb"],
        default={"guesses": 0, "correct": 0, "epsilon_lb": 0.0},
    )
    return {
        "epsilon_lb": best["epsilon_lb"],
        "epsilon_lb_max": epsilon_lb_max(m, alpha),
        "guesses": best["guesses"],
        "correct": best["correct"],
        "epsilon_point": epsilon_point_estimate(best["guesses"], best["correct"]),
        "alpha": alpha,
        "correction": f"Bonferroni over {len(sizes)} guess counts (level {level:.4g} each)",
        "canaries": m,
        "by_guesses": table,
    }
