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
from typing import Protocol

import torch
from torch import nn

from .targets import TargetFn, target_loss


@dataclass
class StepOutput:
    """What a step reports for progress: the mean loss (scalar tensor), the detached
    logits (B, K) and the targets (B,) or (B, K) they were trained towards."""

    loss: torch.Tensor
    logits: torch.Tensor
    targets: torch.Tensor


class GradientStep(Protocol):
    def __call__(
        self,
        model: nn.Module,
        inputs: torch.Tensor,
        indices: torch.Tensor,
        targets: TargetFn,
        autocast: Callable[[], AbstractContextManager],
    ) -> StepOutput: ...


class BackpropStep:
    """Mean loss over the batch, back-propagated: the non-private step."""

    def __call__(
        self,
        model: nn.Module,
        inputs: torch.Tensor,
        indices: torch.Tensor,
        targets: TargetFn,
        autocast: Callable[[], AbstractContextManager],
    ) -> StepOutput:
        with autocast():
            logits = model(inputs)
        batch_targets = targets(indices, logits.detach())
        loss = target_loss(logits, batch_targets)
        loss.backward()
        return StepOutput(loss.detach(), logits.detach(), batch_targets)
