"""RR ("LP-1ST"): every training label randomized once by k-ary randomized response."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..mechanisms import RandomizedResponse
from ..options import EPSILON, SWITCH, Choice, MethodOptions, option
from ..privacy import PrivacyLedger
from ..seeding import Stream
from ..train import HardLabels, TargetFn
from ..train.targets import ForwardCorrectedLabels
from .base import Method, MethodResult, RunContext

#: How a model learns from RR's labels; every choice is post-processing of the release.
LEARNING = ("plain", "forward", "posterior")


def rr_transition(mechanism: RandomizedResponse, device: torch.device) -> torch.Tensor:
    """RR's noise channel T[k, j] = P(ỹ = j | y = k): e^ε/(e^ε+K−1) on the diagonal,
    1/(e^ε+K−1) elsewhere; float64 (K, K)."""
    k, keep = mechanism.num_classes, mechanism.keep_probability
    other = (1 - keep) / (k - 1)
    eye = torch.eye(k, dtype=torch.float64, device=device)
    return eye * keep + (1 - eye) * other


class RRPosterior(TargetFn):
    """Soft targets P(y = k | ỹ, x) ∝ P(ỹ | y = k) · softmax(z)_k for RR's labels ỹ: the
    Bayes posterior of the true label with the current model as the prior (the RR analogue
    of ALIBI's inference). With RR's channel this is ``softmax(z + ε·onehot(ỹ))``.

    noisy: int64 (N,) RR labels. epsilon: RR's ε. num_classes: K."""

    def __init__(self, noisy: torch.Tensor, epsilon: float, num_classes: int) -> None:
        self.noisy = noisy
        self.epsilon = float(epsilon)
        self.num_classes = num_classes

    def __call__(self, indices: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        onehot = F.one_hot(self.noisy[indices], self.num_classes).float()
        return torch.softmax(logits.float() + self.epsilon * onehot, dim=1)


#: ``learning``'s declaration, shared with LP-MST's stage 1.
LEARNING_OPTION_HELP = (
    "how the model learns from RR's labels (all free post-processing): plain cross-entropy, "
    "forward loss correction with RR's channel, or the Bayes posterior given the model"
)


@dataclass(frozen=True)
class RROptions(MethodOptions):
    """Options of ``rr``; see :class:`RandomizedResponseMethod`."""

    epsilon: float = option(kind=EPSILON, help="ε per label (replace one label)")
    secure_noise: bool = option(
        False, kind=SWITCH, help="draw the label noise from OS entropy instead of the run seed"
    )
    learning: str = option("plain", kind=Choice(LEARNING), help=LEARNING_OPTION_HELP)


class RandomizedResponseMethod(Method):
    """Randomizes each training label once with RR at ``epsilon`` (pure ε-label-DP), then
    trains on the noisy labels every epoch.

    epsilon: ε > 0 per label. secure_noise: draw from OS entropy instead of the run seed.
    learning: how the model learns from the RR labels (all post-processing, free):
        "plain" (cross-entropy on the noisy labels), "forward" (forward loss correction
        with RR's known channel, Patrini et al. 2017; see
        :class:`~labeldp.train.targets.ForwardCorrectedLabels`) or "posterior" (soft targets
        that are the Bayes posterior of the true label given the RR label and the current
        model, :class:`RRPosterior`).
    """

    name: ClassVar[str] = "rr"
    Options: ClassVar[type[MethodOptions]] = RROptions

    def run(self, ctx: RunContext) -> MethodResult:
        labels = ctx.train.labels
        mechanism = RandomizedResponse(
            self.epsilon, ctx.train.info.num_classes, secure=self.secure_noise
        )
        generator = None if self.secure_noise else ctx.generator(Stream.RR_NOISE)
        noisy = ctx.privatized("rr", lambda: mechanism.privatize(labels, generator))
        ledger = PrivacyLedger()
        ledger.record(mechanism.ledger_entry(examples=len(noisy)))
        return MethodResult(fit=ctx.fit(rr_targets(self.learning, noisy, mechanism)), ledger=ledger)


def rr_targets(learning: str, noisy: torch.Tensor, mechanism: RandomizedResponse):
    """The training targets for RR labels ``noisy`` under ``learning`` (see LEARNING)."""
    if learning == "forward":
        return ForwardCorrectedLabels(noisy, rr_transition(mechanism, noisy.device))
    if learning == "posterior":
        return RRPosterior(noisy, mechanism.epsilon, mechanism.num_classes)
    return HardLabels(noisy)
