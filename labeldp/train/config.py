"""Hyper-parameters of one training run of the core loop, validated on construction, and
the one optimizer configuration (:class:`SGDConfig`) that every training loop builds its
optimizer and learning-rate schedule from."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..errors import ConfigError, check_int
from .schedule import learning_rate

SCHEDULES = ("onecycle", "cosine", "fixmatch", "constant")
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass(frozen=True)
class SGDConfig:
    """The optimizer of every training loop: SGD with momentum, Nesterov and weight decay,
    and its learning-rate schedule (:func:`~labeldp.train.schedule.learning_rate`).

    Not stored on its own: :attr:`TrainConfig.sgd` and
    :attr:`~labeldp.train.ensemble.EnsembleFixMatchConfig.sgd` derive it from their
    fields, so their fingerprints, reprs and stored identities stay as they were.

    lr: peak learning rate, finite and > 0. momentum in [0, 1); nesterov needs
    momentum > 0. weight_decay: L2 coefficient, finite and ≥ 0, on every parameter.
    schedule: one of :data:`SCHEDULES`. warmup_fraction: share of all steps spent
    warming up, in [0, 1).
    """

    lr: float
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "onecycle"
    warmup_fraction: float = 0.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"lr must be a finite number > 0, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.nesterov and self.momentum == 0:
            raise ConfigError("nesterov needs momentum > 0")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ConfigError(f"weight_decay must be a finite number ≥ 0, got {self.weight_decay}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(
                f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}"
            )
        if not 0 <= self.warmup_fraction < 1:
            raise ConfigError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")

    def build(self, params: Iterable[torch.Tensor]) -> torch.optim.SGD:
        """The optimizer over ``params`` (an nn.Module's parameters, or stacked ones:
        SGD acts elementwise, so each stacked model is updated as if alone). Its
        learning rate is set before every step (:meth:`learning_rate`)."""
        return torch.optim.SGD(
            params,
            lr=self.lr,
            momentum=self.momentum,
            nesterov=self.nesterov,
            weight_decay=self.weight_decay,
        )

    def learning_rate(self, step: int, total_steps: int) -> float:
        """The learning rate of optimizer step ``step`` (0-based) of ``total_steps``."""
        return learning_rate(step, total_steps, self.lr, self.schedule, self.warmup_fraction)


@dataclass(frozen=True)
class TrainConfig:
    """How the core loop trains.

    epochs: passes over the training set, ≥ 1.
    batch_size: examples per step, ≥ 1 (the last batches of an epoch may hold one fewer:
        an epoch is split into ceil(N / batch_size) near-equal batches).
    lr: peak learning rate of the schedule, > 0.
    momentum: SGD momentum in [0, 1); nesterov: Nesterov momentum (needs momentum > 0).
    weight_decay: L2 coefficient ≥ 0, applied by SGD to every parameter.
    schedule: "onecycle" (linear warm-up to ``lr`` over ``warmup_fraction`` of the steps,
        then linear decay to 0), "cosine" (the same warm-up, then cosine decay to 0) or
        "constant".
    warmup_fraction: share of all steps spent warming up, in [0, 1).
    ema_decay: decay of an exponential moving average of the weights in (0, 1), or None
        for no EMA; when set, evaluation uses the averaged weights.
    seed: seeds the model initialisation, batch order and augmentation, ≥ 0.
    eval_every: evaluate on the test split every this many epochs (≥ 1); the last epoch
        is always evaluated.
    eval_batch_size: examples per evaluation batch, ≥ 1.
    precision: "auto" (bf16 autocast on CUDA, fp32 elsewhere), "fp32" or "bf16".
    mixup_alpha: mixup (Zhang et al. 2018) with λ ~ Beta(α, α) per batch, α ≥ 0; 0 turns
        it off. Each batch is mixed with a permutation of itself, inputs and (one-hot or
        soft) targets alike, as the label-DP references train on noisy labels. Only the
        plain back-propagation step mixes: DP-SGD refuses it (a mixed example carries two
        examples' data, which per-example clipping does not bound).

    :attr:`sgd` is the optimizer part (lr … warmup_fraction) as the one
    :class:`SGDConfig` every loop builds its optimizer and schedule from.
    """

    epochs: int
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "onecycle"
    warmup_fraction: float = 0.2
    ema_decay: float | None = None
    seed: int = 0
    eval_every: int = 1
    eval_batch_size: int = 1000
    precision: str = "auto"
    mixup_alpha: float = 0.0

    def __post_init__(self) -> None:
        check_int("epochs", self.epochs, 1)
        check_int("batch_size", self.batch_size, 1)
        check_int("seed", self.seed, 0)
        check_int("eval_every", self.eval_every, 1)
        check_int("eval_batch_size", self.eval_batch_size, 1)
        _ = self.sgd  # validates lr, momentum, nesterov, weight_decay, schedule, warmup
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ConfigError(f"ema_decay must be in (0, 1) or None, got {self.ema_decay}")
        if not (
            isinstance(self.mixup_alpha, (int, float))
            and not isinstance(self.mixup_alpha, bool)
            and math.isfinite(self.mixup_alpha)
            and self.mixup_alpha >= 0
        ):
            raise ConfigError(
                f"mixup_alpha must be a finite number ≥ 0 (0: no mixup), got {self.mixup_alpha!r}"
            )
        if self.precision not in PRECISIONS:
            raise ConfigError(
                f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}"
            )

    @property
    def sgd(self) -> SGDConfig:
        """The optimizer and schedule part of this configuration."""
        return SGDConfig(
            lr=self.lr,
            momentum=self.momentum,
            nesterov=self.nesterov,
            weight_decay=self.weight_decay,
            schedule=self.schedule,
            warmup_fraction=self.warmup_fraction,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
