"""The loop body every training loop runs: one function for a model or stacked models.

:func:`train_steps` runs optimizer steps ``steps`` (global step numbers) of one model (an
``nn.Module``) or of n stacked ones (:class:`~labeldp.train.ensemble.StackedModels`),
each step: batch indices from the ``sampler`` → inputs from the data (augmented with the
``generator``, normalized) → the learning rate of the step → the gradient ``step`` (which
leaves each parameter's ``.grad``) → the optimizer step → the weight average. Around it
each caller keeps only what differs: how its random streams are seeded (the
:class:`~labeldp.train.Trainer` per epoch, the ensemble per step, a federated client per
trip), progress, statistics, evaluation and checkpoints.

:class:`Optimization` is the state those steps update: the SGD optimizer built from the
one :class:`~labeldp.train.config.SGDConfig`, the schedule's length and the optional
weight average (:class:`~labeldp.train.ema.WeightAverage` for a module,
:class:`~labeldp.train.ema.StackedWeightAverage` for stacked parameters).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Protocol

import torch

from .config import SGDConfig
from .sampling import BatchSampler
from .steps import GradientStep, StepOutput
from .targets import TargetFn

#: uint8 data, a sampler's indices, the generator → the model's inputs.
InputFn = Callable[[torch.Tensor, Any, torch.Generator], torch.Tensor]


class Average(Protocol):
    """A weight average updated after every optimizer step."""

    def update(self, model: Any, step: int) -> None: ...

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...


class Optimization:
    """What the optimizer steps of :func:`train_steps` update.

    sgd: the optimizer configuration. params: the parameters it optimizes (a module's,
    or the stacked ones, in a fixed order: the optimizer's state is stored by position).
    total_steps: the schedule's length (``sgd.learning_rate(step, total_steps)``).
    ema: a weight average updated after each step with the global step number, or None.
    """

    def __init__(
        self,
        sgd: SGDConfig,
        params: Iterable[torch.Tensor],
        total_steps: int,
        ema: Average | None = None,
    ) -> None:
        self.sgd = sgd
        self.optimizer = sgd.build(params)
        self.total_steps = total_steps
        self.ema = ema

    def learning_rate(self, step: int) -> float:
        return self.sgd.learning_rate(step, self.total_steps)

    def begin(self, step: int) -> float:
        """Before the gradient of step ``step``: sets its learning rate (returned) and
        clears the gradients."""
        lr = self.learning_rate(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        return lr

    def end(self, model: Any, step: int) -> None:
        """After the gradient of step ``step``: the optimizer step, then the average."""
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update(model, step)


def plain_inputs(
    normalize: Callable[[torch.Tensor], torch.Tensor],
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None,
) -> InputFn:
    """The inputs of one model: ``data[indices]``, augmented with the generator (when
    ``augment`` is given), normalized, in channels-last layout."""

    def inputs(data: torch.Tensor, indices: torch.Tensor, generator: torch.Generator):
        images = data[indices]
        if augment is not None:
            images = augment(images, generator)
        return normalize(images).contiguous(memory_format=torch.channels_last)

    return inputs


def train_steps(
    model: Any,
    data: torch.Tensor,
    targets: TargetFn,
    steps: range,
    step: GradientStep,
    sampler: BatchSampler,
    generator: torch.Generator,
    *,
    optimization: Optimization,
    inputs: InputFn,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
    after_step: Callable[[int, Any, StepOutput], None] | None = None,
) -> float | None:
    """Runs optimizer steps ``steps`` (consecutive global step numbers: they set the
    learning rate and the average's warm-up) of ``model`` towards ``targets``.

    model: an ``nn.Module``, or stacked models (anything the gradient ``step`` and the
        average accept). data: what ``inputs`` reads (uint8 images).
    step: makes the gradients (:class:`~labeldp.train.steps.GradientStep`):
        ``step(model, inputs, indices, targets, autocast)``.
    sampler: its ``batches(len(data), generator)`` gives one index batch per step; the
        loop stops at the end of ``steps`` or of the batches, whichever comes first.
    generator: the sampler's and the augmentation's random stream (seeded by the
        caller; nothing else is drawn from it here).
    optimization: the optimizer, schedule and average the steps update.
    inputs: ``inputs(data, indices, generator)``, the model's inputs for one batch.
    after_step: called as ``after_step(step_number, indices, output)`` after each step
        (statistics, progress).

    Returns the learning rate of the last step run, None when none ran.
    """
    lr = None
    for number, indices in zip(steps, sampler.batches(data.shape[0], generator), strict=False):
        lr = optimization.begin(number)
        batch = inputs(data, indices, generator)
        out = step(model, batch, indices, targets, autocast)
        optimization.end(model, number)
        if after_step is not None:
            after_step(number, indices, out)
    return lr


__all__ = ["Average", "InputFn", "Optimization", "plain_inputs", "train_steps"]
