"""Training targets: what each batch is trained towards, and the loss against it.

A target function maps a batch to its targets. It receives the dataset indices of the
batch and the model's current logits on it (detached), so a method may derive targets
from the model's own predictions, as ALIBI's Bayesian posterior does. It returns either

- hard labels: an int64 tensor (B,) with values in 0..K−1, or
- soft targets: a float tensor (B, K) whose rows are probability vectors.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F


class TargetFn(Protocol):
    """``uses_logits`` (optional attribute, default True): False when the targets do not
    depend on the logits, so a step may skip the forward pass that computes them and pass
    None (DP-SGD does)."""

    def __call__(self, indices: torch.Tensor, logits: torch.Tensor) -> torch.Tensor: ...


class HardLabels:
    """Fixed hard labels, one per training example (true labels, or labels that a
    mechanism randomized once). ``labels``: int64 (N,) on the training device."""

    uses_logits = False

    def __init__(self, labels: torch.Tensor) -> None:
        if labels.dtype != torch.int64 or labels.dim() != 1:
            raise ValueError(
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


def loss_function(targets: TargetFn):
    """The loss a step minimizes for ``targets``: their own ``loss(logits, batch_targets,
    reduction)`` when they define one (forward correction), else :func:`target_loss`."""
    return getattr(targets, "loss", target_loss)


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
            raise ValueError(
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
