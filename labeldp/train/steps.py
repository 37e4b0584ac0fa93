"""The gradient step: the hook around the optimizer step.

A gradient step runs the forward pass on one batch, asks the target function for the
batch's targets, and leaves in every parameter's ``.grad`` the gradient the optimizer will
apply. The default back-propagates the mean loss; DP-SGD plugs in a step that computes
per-example gradients, clips and noises them instead. The loop owns the optimizer, the
learning rate, the EMA and the schedule; a step owns only how gradients are made.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..errors import ConfigError
from .targets import TargetFn, soft_targets


@dataclass
class StepOutput:
    """What a step reports for progress: the mean loss (scalar tensor), the detached
    logits (B, K) and the targets (B,) or (B, K) they were trained towards."""

    loss: torch.Tensor
    logits: torch.Tensor
    targets: torch.Tensor


class GradientStep:
    """Base class of gradient steps; subclasses implement ``__call__`` and may override
    the declared capabilities below (``tests/test_capabilities.py`` refuses any other
    class-level attribute, so a misspelt capability fails the suite).

    private_outputs: the step's loss, logits and targets are covered by its privacy
    guarantee only through the released model (DP-SGD), so the loop neither shows nor
    records training statistics. Default False.
    supports_mixup: the step mixes batches when the run sets ``mixup_alpha``; the loop
    refuses mixup for a step that does not. Default False.
    start_epoch(epoch): called by the loop before each epoch (0-based), for a step with
    its own per-epoch random stream; default: nothing.
    epoch_statistics(): called by the loop after each epoch; the numbers it returns join
    that epoch's history entry (metrics.json). They must be covered by the step's
    guarantee (functions of what the step releases); default: none.
    """

    private_outputs: ClassVar[bool] = False
    supports_mixup: ClassVar[bool] = False

    def start_epoch(self, epoch: int) -> None:
        """Before epoch ``epoch`` (0-based); the default does nothing."""

    def epoch_statistics(self) -> dict[str, float]:
        """Statistics of the epoch just finished, for its history entry; default none."""
        return {}

    def __call__(
        self,
        model: nn.Module,
        inputs: torch.Tensor,
        indices: torch.Tensor,
        targets: TargetFn,
        autocast: Callable[[], AbstractContextManager],
    ) -> StepOutput:
        raise NotImplementedError(f"{type(self).__name__} must implement __call__")


def mixup_pairs(batch: int, alpha: float, device: torch.device) -> tuple[float, torch.Tensor]:
    """Mixup's draws for one batch (Zhang et al. 2018): λ ~ Beta(α, α), once per batch, and
    a random permutation π of the batch; mix with :func:`mix`. Draws from torch's global
    generator (the loop seeds it per epoch). alpha > 0."""
    if not alpha > 0:
        raise ConfigError(f"mixup alpha must be > 0, got {alpha}")
    lam = float(torch.distributions.Beta(float(alpha), float(alpha)).sample())
    return lam, torch.randperm(batch).to(device)


def mix(values: torch.Tensor, lam: float, perm: torch.Tensor) -> torch.Tensor:
    """``λ·v + (1−λ)·v[π]``: mixed inputs, or mixed soft targets (B, K)."""
    return lam * values + (1 - lam) * values[perm]


class BackpropStep(GradientStep):
    """Mean loss over the batch, back-propagated: the non-private step.

    mixup_alpha: mix each batch (see :func:`mixup`) with λ ~ Beta(α, α); 0: no mixup.
    Targets that depend on the model (ALIBI's or RR's posterior) are computed from the
    model's logits on the unmixed batch (one more forward pass without gradients; in train
    mode, so BatchNorm's running statistics also see the clean batch), then mixed; targets
    with their own loss (forward correction) receive the mixed soft targets."""

    supports_mixup: ClassVar[bool] = True

    def __init__(self, mixup_alpha: float = 0.0) -> None:
        if not mixup_alpha >= 0:
            raise ConfigError(f"mixup_alpha must be ≥ 0, got {mixup_alpha}")
        self.mixup_alpha = float(mixup_alpha)

    def __call__(
        self,
        model: nn.Module,
        inputs: torch.Tensor,
        indices: torch.Tensor,
        targets: TargetFn,
        autocast: Callable[[], AbstractContextManager],
    ) -> StepOutput:
        if self.mixup_alpha > 0:
            return self._mixed(model, inputs, indices, targets, autocast)
        with autocast():
            logits = model(inputs)
        batch_targets = targets(indices, logits.detach())
        loss = targets.loss(logits, batch_targets)
        loss.backward()
        return StepOutput(loss.detach(), logits.detach(), batch_targets)

    def _mixed(self, model, inputs, indices, targets, autocast) -> StepOutput:
        current = None
        if targets.uses_logits:
            with torch.no_grad(), autocast():
                current = model(inputs).float()
        batch_targets = targets(indices, current)
        lam, perm = mixup_pairs(inputs.shape[0], self.mixup_alpha, inputs.device)
        with autocast():
            logits = model(mix(inputs, lam, perm))
        mixed = mix(soft_targets(batch_targets, logits.shape[1]), lam, perm)
        loss = targets.loss(logits, mixed)
        loss.backward()
        return StepOutput(loss.detach(), logits.detach(), mixed)
