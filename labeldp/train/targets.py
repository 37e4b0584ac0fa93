"""Training targets: what each batch is trained towards, and the loss against it.

A target function maps a batch to its targets. It receives the dataset indices of the
batch and the model's current logits on it (detached), so a method may derive targets
from the model's own predictions, as ALIBI's Bayesian posterior does. It returns either

- hard labels: an int64 tensor (B,) with values in 0..K−1, or
- soft targets: a float tensor (B, K) whose rows are probability vectors.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..errors import ConfigError


class TargetFn:
    """Base class of target functions; subclasses implement ``__call__`` and may override
    the declared capabilities below (``tests/test_capabilities.py`` refuses any other
    class-level attribute, so a misspelt capability fails the suite).

    uses_logits: False when the targets do not depend on the logits, so a step may skip
    the forward pass that computes them and pass None (DP-SGD does). Default True.
    loss(logits, batch_targets, reduction): what a step minimizes; default
    :func:`target_loss` (forward correction overrides it).
    """

    uses_logits: ClassVar[bool] = True

    def __call__(self, indices: torch.Tensor, logits: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement __call__")

    def loss(
        self, logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean"
    ) -> torch.Tensor:
        return target_loss(logits, targets, reduction)


class CallableTargets(TargetFn):
    """A plain function ``fn(indices, logits) -> targets`` as a :class:`TargetFn` (it is
    given the logits; its loss is :func:`target_loss`)."""

    def __init__(self, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        self.fn = fn

    def __call__(self, indices: torch.Tensor, logits: torch.Tensor | None) -> torch.Tensor:
        return self.fn(indices, logits)


def as_targets(targets: object) -> TargetFn:
    """``targets`` as a :class:`TargetFn`: a TargetFn as it is, a plain callable wrapped
    in :class:`CallableTargets`; anything else is a ConfigError."""
    if isinstance(targets, TargetFn):
        return targets
    if callable(targets):
        return CallableTargets(targets)
    raise ConfigError(
        f"targets must be a TargetFn or a function (indices, logits) -> targets, got "
        f"{type(targets).__name__}"
    )


class HardLabels(TargetFn):
    """Fixed hard labels, one per training example (true labels, or labels that a
    mechanism randomized once). ``labels``: int64 (N,) on the training device."""

    uses_logits = False

    def __init__(self, labels: torch.Tensor) -> None:
        if labels.dtype != torch.int64 or labels.dim() != 1:
            raise ConfigError(
                f"labels must be an int64 vector, got {labels.dtype} {tuple(labels.shape)}"
            )
        self.labels = labels

    def __call__(self, indices: torch.Tensor, logits: torch.Tensor | None) -> torch.Tensor:
        return self.labels[indices]


def target_loss(
    logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """Cross-entropy of ``logits`` (B, K) against hard labels (B,) or soft targets (B, K):
    ``−Σ_k t_k log softmax(logits)_k``, in float32 (float64 for float64 logits) whatever
    the autocast dtype.
    ``reduction``: "mean" or "none" (per example)."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    if targets.dtype == torch.int64:
        return F.cross_entropy(logits, targets, reduction=reduction)
    per_example = -(targets * F.log_softmax(logits, dim=1)).sum(dim=1)
    return per_example.mean() if reduction == "mean" else per_example


def soft_targets(targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Targets as probability rows (B, K) float32: one-hot rows for hard labels (B,)."""
    if targets.dtype == torch.int64:
        return F.one_hot(targets, num_classes).float()
    return targets.float()


class ForwardCorrectedLabels(HardLabels):
    """Noisy hard labels trained with forward loss correction (Patrini et al. 2017):
    the loss is ``−log (softmax(z) · T)_ỹ`` where ``T[k, j] = P(ỹ = j | y = k)`` is the
    known noise channel, so the model learns P(y | x) while fitting P(ỹ | x).
    Post-processing of the released labels: free of privacy cost.

    labels: int64 (N,) noisy labels. transition: float (K, K), rows summing to 1, on the
    labels' device."""

    def __init__(self, labels: torch.Tensor, transition: torch.Tensor) -> None:
        super().__init__(labels)
        k = transition.shape[0]
        if transition.shape != (k, k) or not torch.allclose(
            transition.sum(dim=1), torch.ones(k, dtype=transition.dtype, device=transition.device)
        ):
            raise ConfigError(
                f"transition must be a (K, K) row-stochastic matrix, got {tuple(transition.shape)}"
            )
        self.transition = transition.float()

    def loss(
        self, logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean"
    ) -> torch.Tensor:
        """``−log Σ_k softmax(z)_k T[k, ỹ]`` per example for hard labels ỹ (B,); for soft
        targets t (B, K) (mixed labels) the cross-entropy ``−Σ_j t_j log (softmax(z) T)_j``
        against the predicted distribution of the noisy label. In log space, float32."""
        log_p = F.log_softmax(logits.float(), dim=1)  # (B, K)
        log_t = self.transition.log()  # (K, K)
        log_noisy = torch.logsumexp(log_p.unsqueeze(2) + log_t.unsqueeze(0), dim=1)  # (B, K)
        if targets.dtype == torch.int64:
            per_example = -log_noisy.gather(1, targets.unsqueeze(1)).squeeze(1)
        else:
            per_example = -(targets * log_noisy).sum(dim=1)
        return per_example.mean() if reduction == "mean" else per_example


def target_classes(targets: torch.Tensor) -> torch.Tensor:
    """The class each target points at: the label itself, or the argmax of a soft target."""
    return targets if targets.dtype == torch.int64 else targets.argmax(dim=1)
