"""Exponential moving average of a model's weights."""

from __future__ import annotations

import copy

import torch
from torch import nn


def decay_at(decay: float, updates: int) -> float:
    """The decay of update number ``updates`` (0 for the first) with warm-up:
    ``min(decay, (1 + updates) / (10 + updates))``, the ``num_updates`` rule of
    TensorFlow's ExponentialMovingAverage. Without it the average of a short run is mostly
    its random initialization: after s steps plain decay 0.999 still weighs the initial
    weights by 0.999^s (0.74 after 300 steps, 0.37 after 1000); with it the first update
    copies the weights (decay 0.1) and the window grows with the run until it reaches
    ``decay``. ``decay`` in (0, 1); ``updates`` ≥ 0.
    """
    return min(decay, (1.0 + updates) / (10.0 + updates))


class WeightAverage:
    """Keeps ``averaged = d · averaged + (1 − d) · current`` for every parameter after each
    optimizer step, with d = :func:`decay_at` (``decay``, step): the window warms up over
    the first steps; buffers (BatchNorm statistics) are copied as they are.

    ``decay`` in (0, 1): the weight of the past per step once warmed up (0.999 ≈ a
    1000-step window).
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Averages in ``model``'s weights after optimizer step number ``step`` (0 for
        the first step of the run; a resumed run passes the global step)."""
        averaged = list(self.model.parameters())
        current = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(averaged, current, 1.0 - decay_at(self.decay, step))
        for mine, theirs in zip(self.model.buffers(), model.buffers(), strict=True):
            mine.copy_(theirs)

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)


class StackedWeightAverage:
    """:class:`WeightAverage` for stacked parameters (a dict name → (n, ...) tensor, as
    :class:`~labeldp.train.ensemble.StackedModels` keeps them): ``averaged = d · averaged
    + (1 − d) · current`` elementwise, so each stacked model is averaged as if alone, with
    d = :func:`decay_at` (``decay``, step). Starts from a copy of ``params``.

    ``average``: the averaged parameters (the same dict layout); what ``state_dict``
    returns and ``load_state_dict`` replaces.
    """

    def __init__(self, params: dict[str, torch.Tensor], decay: float) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.average = {k: v.detach().clone() for k, v in params.items()}

    @torch.no_grad()
    def update(self, model, step: int) -> None:
        """Averages in the stacked parameters ``model.params`` after optimizer step
        number ``step`` (0 for the first of the run)."""
        for key, value in model.params.items():
            self.average[key].lerp_(value, 1.0 - decay_at(self.decay, step))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.average

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.average = state
