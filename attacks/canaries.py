"""Canaries: training examples whose labels the auditor sets, before any method sees them.

Two kinds, on disjoint random training examples (chosen from a seeded permutation of the
indices, never by looking at labels):

- memorization canaries (Malek et al. 2021): the label is replaced by a uniformly random
  wrong label y′; the attack later compares the model's confidence on y′ with that on
  another wrong label y″, drawn now (uniform among the K − 2 others);
- audit canaries (Steinke et al. 2023): two distinct wrong candidate labels (a, b) drawn
  the same way, and the training label set by a fair coin between them. Wrong candidates
  keep the model's generalization to the true class from diluting the audit; the coin is
  independent of everything else, which is all the DP argument needs.

Control images: as many random test images as memorization canaries, whose outputs the
run stores too (a reference for how the model treats images it never trained on).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from labeldp.errors import ConfigError


@dataclass
class Canaries:
    """What was planted, in positions of the training split (after any subset).

    indices, original_labels, canary_labels (y′), other_labels (y″): memorization
    canaries. audit_indices, audit_a, audit_b, audit_is_a: audit canaries and their coins.
    control_indices: positions in the test split. All int64 (bool for audit_is_a), CPU.
    """

    indices: torch.Tensor
    original_labels: torch.Tensor
    canary_labels: torch.Tensor
    other_labels: torch.Tensor
    audit_indices: torch.Tensor
    audit_a: torch.Tensor
    audit_b: torch.Tensor
    audit_is_a: torch.Tensor
    control_indices: torch.Tensor

    def training_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """``labels`` with the canaries' labels in place (a new tensor, same device)."""
        out = labels.clone()
        out[self.indices.to(labels.device)] = self.canary_labels.to(labels.device)
        audit_labels = torch.where(self.audit_is_a, self.audit_a, self.audit_b)
        out[self.audit_indices.to(labels.device)] = audit_labels.to(labels.device)
        return out

    def save(self, path: str | Path) -> None:
        from labeldp.io import atomic_write

        state = asdict(self)
        atomic_write(path, lambda handle: torch.save(state, handle))

    @classmethod
    def load(cls, path: str | Path) -> Canaries:
        return cls(**torch.load(path, map_location="cpu", weights_only=True))


def _two_wrong_labels(
    labels: torch.Tensor, num_classes: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(first, second): first uniform among the K − 1 labels ≠ label, second uniform among
    the K − 2 labels ≠ label and ≠ first."""
    n = labels.shape[0]
    offset1 = torch.randint(1, num_classes, (n,), generator=generator)
    offset2 = torch.randint(1, max(num_classes - 1, 2), (n,), generator=generator)
    offset2 = offset2 + (offset2 >= offset1).long()  # skip offset1: uniform over the rest
    return (labels + offset1) % num_classes, (labels + offset2) % num_classes


def plant(
    labels: torch.Tensor,
    num_classes: int,
    num_canaries: int,
    num_audit: int,
    num_test: int,
    generator: torch.Generator,
) -> Canaries:
    """Chooses and labels the canaries. ``labels``: the true training labels (N,);
    ``generator``: a CPU generator (the run's canary stream)."""
    n = labels.shape[0]
    if num_canaries < 0 or num_audit < 0:
        raise ConfigError("canaries and audit_canaries must be ≥ 0")
    if num_canaries + num_audit > n:
        raise ConfigError(
            f"canaries + audit_canaries must be at most the training set size {n}, "
            f"got {num_canaries} + {num_audit}"
        )
    if num_canaries and num_classes < 3:
        raise ConfigError("memorization canaries need at least 3 classes (y′ and another wrong y″)")
    if num_audit and num_classes < 3:
        raise ConfigError("audit canaries need at least 3 classes (two wrong candidate labels)")
    labels = labels.cpu()
    order = torch.randperm(n, generator=generator)
    idx, audit_idx = order[:num_canaries], order[num_canaries : num_canaries + num_audit]
    original = labels[idx]
    canary, other = _two_wrong_labels(original, num_classes, generator)
    a, b = _two_wrong_labels(labels[audit_idx], num_classes, generator)
    coin = torch.rand(num_audit, generator=generator) < 0.5
    control = torch.randperm(num_test, generator=generator)[: min(num_canaries, num_test)]
    return Canaries(idx, original, canary, other, audit_idx, a, b, coin, control)
