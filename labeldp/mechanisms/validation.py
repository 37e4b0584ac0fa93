"""Argument checks shared by the mechanisms; each raises ConfigError (a ValueError)
naming the argument and its allowed range."""

from __future__ import annotations

import math

import torch

from ..errors import ConfigError, check_int

PRIOR_TOLERANCE = 1e-4  # rows of a prior must sum to 1 within this (float32 softmax)


def check_epsilon(epsilon: float) -> float:
    """ε must be a finite number > 0."""
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)):
        raise ConfigError(f"epsilon must be a finite number > 0, got {epsilon!r}")
    if not (math.isfinite(epsilon) and epsilon > 0):
        raise ConfigError(f"epsilon must be a finite number > 0, got {epsilon}")
    return float(epsilon)


def check_num_classes(num_classes: int) -> int:
    """K must be an integer ≥ 2."""
    return check_int("num_classes", num_classes, 2)


def check_labels(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Labels must be a 1-D integer tensor with values in 0..K−1."""
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1:
        raise ConfigError("labels must be a 1-D integer tensor of class indices")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
        raise ConfigError(f"labels must be integer class indices, got dtype {labels.dtype}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ConfigError(
            f"labels must lie in 0..{num_classes - 1}, got values from {int(labels.min())} "
            f"to {int(labels.max())}"
        )
    return labels.long()


def check_prior(prior: torch.Tensor, num_rows: int | None = None) -> torch.Tensor:
    """A prior is a float tensor (N, K), K ≥ 2, entries ≥ 0, each row summing to 1."""
    if not isinstance(prior, torch.Tensor) or prior.dim() != 2 or not prior.dtype.is_floating_point:
        raise ConfigError("prior must be a float tensor of shape (N, K), one distribution per row")
    if num_rows is not None and prior.shape[0] != num_rows:
        raise ConfigError(
            f"prior must have one row per label: expected {num_rows} rows, got {prior.shape[0]}"
        )
    if prior.shape[1] < 2:
        raise ConfigError(f"prior must have K ≥ 2 columns, got {prior.shape[1]}")
    if not bool(torch.isfinite(prior).all()) or bool((prior < 0).any()):
        raise ConfigError("prior entries must be finite and ≥ 0")
    sums = prior.double().sum(dim=1)
    worst = (sums - 1).abs().max().item() if prior.shape[0] else 0.0
    if worst > PRIOR_TOLERANCE:
        raise ConfigError(
            f"prior rows must sum to 1 (±{PRIOR_TOLERANCE:g}); one row is off by {worst:.3g}"
        )
    return prior
