"""FixMatch (Sohn et al. 2020) as a gradient step of the training core.

Spec: shared/specs/pate_fixmatch.md (FixMatch). Each step takes the loop's labeled batch
(B examples, weakly augmented and normalized by the loop) and draws μ·B unlabeled images
itself, uniformly with replacement from ``unlabeled`` (uint8, on the device). The model
sees one concatenated batch: labeled, weak unlabeled views, strong unlabeled views.

- labeled loss: the usual target loss on the labeled logits;
- unlabeled loss: pseudo-label = argmax of the (detached) softmax on the weak view, kept
  when its probability ≥ τ; cross-entropy of the strong view against it, averaged over
  all μ·B unlabeled examples (unconfident ones count as zero), weight λ_u.

Use with ``TrainConfig(ema_decay=0.999)`` for FixMatch's EMA model. The learning rate is
the loop's (``TrainConfig.schedule``); FixMatch's own schedule, lr·cos(7π·k / (16·K)) at
step k of K, is :func:`~labeldp.train.schedule.learning_rate`'s "fixmatch" kind, which the
teachers (:class:`~labeldp.train.ensemble.EnsembleFixMatchConfig`) use. The unlabeled draws
and their augmentation come from the step's own generator, reseeded from (seed, epoch)
by the loop (:meth:`FixMatchStep.start_epoch`), so a resumed run is bit-exact.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
import torch.nn.functional as F
from torch import nn

from ..augment import Normalize
from ..errors import ConfigError, check_int
from ..seeding import Stream, derive_seed
from .steps import GradientStep, StepOutput
from .targets import TargetFn

Augmentation = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def pseudo_label_losses(
    weak_logits: torch.Tensor, strong_logits: torch.Tensor, threshold: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example terms of FixMatch's unlabeled loss, for logits of shape (..., K).

    Returns (mask · CE(strong, pseudo-label), mask), both of the leading shape, where
    pseudo-label = argmax softmax(weak) and mask = its probability ≥ ``threshold``. No
    gradient flows through the weak view."""
    probs = torch.softmax(weak_logits.detach().float(), dim=-1)
    confidence, pseudo = probs.max(dim=-1)
    mask = confidence >= threshold
    k = strong_logits.shape[-1]
    ce = F.cross_entropy(strong_logits.reshape(-1, k).float(), pseudo.flatten(), reduction="none")
    return ce.view(mask.shape) * mask, mask


def unlabeled_loss(
    weak_logits: torch.Tensor, strong_logits: torch.Tensor, threshold: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """FixMatch's unlabeled loss over (U, K) logits: the mean over all U examples of the
    masked cross-entropy (unconfident ones count as 0), and the mask (U,)."""
    losses, mask = pseudo_label_losses(weak_logits, strong_logits, threshold)
    return losses.mean(), mask


class FixMatchStep(GradientStep):
    """The FixMatch gradient step (a :class:`~labeldp.train.steps.GradientStep`).

    unlabeled: uint8 (M, C, H, W) images on the training device. normalize: as the loop's.
    weak, strong: uint8 → uint8 batch augmentations taking a generator.
    mu: unlabeled examples per labeled one (≥ 1). threshold: τ in (0, 1].
    lambda_u: weight of the unlabeled loss (≥ 0). seed: seeds the per-epoch generator.
    labeled_batch: the nominal labeled batch B (≥ 1): each step draws μ·B unlabeled
    images, also when the labeled batch is smaller (e.g. a student with fewer labels than
    B); None: μ times each step's labeled batch.
    """

    def __init__(
        self,
        unlabeled: torch.Tensor,
        normalize: Normalize,
        weak: Augmentation,
        strong: Augmentation,
        mu: int = 7,
        threshold: float = 0.95,
        lambda_u: float = 1.0,
        seed: int = 0,
        labeled_batch: int | None = None,
    ) -> None:
        if unlabeled.dtype != torch.uint8 or unlabeled.dim() != 4 or len(unlabeled) == 0:
            raise ConfigError("unlabeled must be a non-empty uint8 (M, C, H, W) image tensor")
        if isinstance(mu, bool) or not isinstance(mu, int) or mu < 1:
            raise ConfigError(f"mu must be an integer ≥ 1, got {mu!r}")
        if not 0 < threshold <= 1:
            raise ConfigError(f"threshold must be in (0, 1], got {threshold}")
        if not lambda_u >= 0:
            raise ConfigError(f"lambda_u must be ≥ 0, got {lambda_u}")
        if labeled_batch is not None:
            check_int("labeled_batch", labeled_batch, 1)
        self.labeled_batch = labeled_batch
        self.unlabeled = unlabeled
        self.normalize = normalize
        self.weak = weak
        self.strong = strong
        self.mu = mu
        self.threshold = float(threshold)
        self.lambda_u = float(lambda_u)
        self.seed = seed
        self.generator = torch.Generator(device=unlabeled.device)
        self.start_epoch(0)
        self.last_mask_rate = float("nan")  # share of confident pseudo-labels, last step

    def start_epoch(self, epoch: int) -> None:
        """Reseeds the unlabeled draws and their augmentation for ``epoch``."""
        self.generator.manual_seed(derive_seed(self.seed, Stream.FIXMATCH_UNLABELED, epoch))

    def _view(self, images: torch.Tensor, augment: Augmentation) -> torch.Tensor:
        return self.normalize(augment(images, self.generator)).contiguous(
            memory_format=torch.channels_last
        )

    def __call__(
        self,
        model: nn.Module,
        inputs: torch.Tensor,
        indices: torch.Tensor,
        targets: TargetFn,
        autocast: Callable[[], AbstractContextManager],
    ) -> StepOutput:
        b = inputs.shape[0]
        u = self.mu * (self.labeled_batch or b)
        pick = torch.randint(
            0, len(self.unlabeled), (u,), generator=self.generator, device=self.generator.device,
        )  # fmt: skip
        images = self.unlabeled[pick.to(self.unlabeled.device)]
        weak, strong = self._view(images, self.weak), self._view(images, self.strong)
        with autocast():
            logits = model(torch.cat([inputs, weak, strong]))
        labeled, weak_logits, strong_logits = logits.split([b, u, u])
        batch_targets = targets(indices, labeled.detach())
        loss_u, mask = unlabeled_loss(weak_logits, strong_logits, self.threshold)
        loss = targets.loss(labeled, batch_targets) + self.lambda_u * loss_u
        loss.backward()
        self.last_mask_rate = mask.float().mean().item()
        return StepOutput(loss.detach(), labeled.detach(), batch_targets)
