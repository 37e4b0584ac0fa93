"""k-ary randomized response (Warner 1965; "LP-1ST" in Ghazi et al. 2021)."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import dp_accounting
import torch

from ..privacy.events import randomized_response_event
from .base import LabelMechanism
from .randomness import check_source, uniform
from .validation import check_epsilon, check_labels, check_num_classes


class RandomizedResponse(LabelMechanism):
    """Keeps the true label with probability e^ε / (e^ε + K − 1), otherwise outputs one of
    the other K − 1 labels uniformly at random. Pure ε-label-DP (δ = 0) per label.

    epsilon: ε > 0, finite. num_classes: K ≥ 2. secure: draw from OS entropy (see
    :mod:`labeldp.mechanisms.randomness` for what that protects).

    >>> rr = RandomizedResponse(epsilon=1.0, num_classes=10)
    >>> noisy = rr.privatize(torch.tensor([3, 1, 4]), generator=torch.Generator().manual_seed(0))
    >>> noisy.shape
    torch.Size([3])
    """

    name: ClassVar[str] = "randomized-response"

    def __init__(self, epsilon: float, num_classes: int, secure: bool = False) -> None:
        self.epsilon = check_epsilon(epsilon)
        self.num_classes = check_num_classes(num_classes)
        self.secure = bool(secure)
        self.delta = 0.0

    @property
    def keep_probability(self) -> float:
        """Pr[output = true label] = e^ε / (e^ε + K − 1), computed stably."""
        return 1.0 / (1.0 + (self.num_classes - 1) * math.exp(-self.epsilon))

    def details(self) -> dict[str, Any]:
        return {
            "num_classes": self.num_classes,
            "keep_probability": self.keep_probability,
            "secure": self.secure,
        }

    def dp_event(self) -> dp_accounting.DpEvent:
        """``RandomizedResponseDpEvent`` over K buckets with noise parameter
        p = K/(e^ε + K − 1): the same mechanism (see
        :func:`~labeldp.privacy.events.randomized_response_event`)."""
        return randomized_response_event(self.epsilon, self.num_classes)

    def event_note(self) -> str:
        return "exact: K-ary randomized response"

    def output_probabilities(self, labels: torch.Tensor) -> torch.Tensor:
        """The exact output distribution for each label: float64 (N, K)."""
        labels = check_labels(labels, self.num_classes)
        keep = self.keep_probability
        other = (1.0 - keep) / (self.num_classes - 1)
        probs = torch.full(
            (labels.shape[0], self.num_classes), other, dtype=torch.float64, device=labels.device
        )
        probs[torch.arange(labels.shape[0], device=labels.device), labels] = keep
        return probs

    def privatize(
        self, labels: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Randomizes each label once: int64 (N,), values in 0..K−1, on the labels' device."""
        labels = check_labels(labels, self.num_classes)
        check_source(generator, self.secure)
        n, device = labels.shape[0], labels.device
        u = uniform((2, n), generator=generator, secure=self.secure, device=device)
        keep = u[0] < self.keep_probability
        # Any other label, uniformly: add an offset in 1..K−1 modulo K.
        offset = 1 + (u[1] * (self.num_classes - 1)).long().clamp_(max=self.num_classes - 2)
        return torch.where(keep, labels, (labels + offset) % self.num_classes)
