"""Label inference (Wu, Zhou, Weinberger, Guo, AISTATS 2023).

A label-DP model can predict its own training labels well simply because it
generalizes. What label DP bounds is the attacker's advantage over the best guess from
features alone. The attack here predicts the argmax of the model's output; its accuracy
on training labels is compared with the same attack on held-out examples (an estimate of
the features-only baseline), and the gap is reported next to the bound ε implies.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def label_inference(
    train_probs: torch.Tensor,
    train_labels: torch.Tensor,
    heldout_probs: torch.Tensor,
    heldout_labels: torch.Tensor,
    epsilon: float | None,
    delta: float | None = None,
) -> dict[str, Any]:
    """Attack accuracy on training labels, on held-out labels, their gap, and the bound.

    Under (ε, δ)-label-DP, for any attacker A and any label prior, Pr[A recovers the
    training label] ≤ e^ε · (best features-only accuracy) + δ. The features-only (Bayes)
    accuracy is unknown; this model's held-out accuracy stands in for it, so
    min(1, e^ε · held-out accuracy + δ) is an *estimate* of the bound, not a bound (the
    Bayes accuracy can be higher). ε = None means non-private: no bound."""
    train_acc = (train_probs.argmax(1) == train_labels).double().mean().item()
    heldout_acc = (heldout_probs.argmax(1) == heldout_labels).double().mean().item()
    bound = None if epsilon is None else _bound(epsilon, heldout_acc, delta or 0.0)
    return {
        "train_accuracy": train_acc,
        "heldout_accuracy": heldout_acc,
        "gap": train_acc - heldout_acc,
        "dp_bound_estimate_on_train_accuracy": bound,
        "train_examples": int(train_labels.numel()),
        "heldout_examples": int(heldout_labels.numel()),
    }


def _bound(epsilon: float, accuracy: float, delta: float) -> float:
    """min(1, e^ε · accuracy + δ), computed in log space: any ε, however large (or ∞),
    gives a number in [0, 1] instead of overflowing."""
    if accuracy <= 0:
        return min(1.0, delta)
    log_term = epsilon + math.log(accuracy)
    if log_term >= 0:  # e^ε · accuracy ≥ 1 already
        return 1.0
    term = math.exp(epsilon) * accuracy if epsilon < 700 else math.exp(log_term)
    return min(1.0, term + delta)
