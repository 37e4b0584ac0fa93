"""ALIBI: Laplace (or Gaussian) noise on one-hot labels, once per example, and training
on the Bayesian posterior recomputed every step with the current model as the prior."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..mechanisms import Alibi
from ..mechanisms.alibi import NOISES
from ..options import DELTA, EPSILON, SWITCH, Choice, MethodOptions, option
from ..privacy import PrivacyLedger
from ..seeding import Stream
from ..train import TargetFn
from .base import Method, MethodResult, RunContext

PRIORS = ("model", "uniform")


class AlibiTargets(TargetFn):
    """Soft targets P(k | ỹ) for a batch: the prior is softmax of the model's current
    logits on the same batch (``prior="model"``, the paper's iterative variant) or
    uniform. ``noisy``: (N, K) noised one-hot labels, drawn once and reused every epoch."""

    def __init__(self, mechanism: Alibi, noisy: torch.Tensor, prior: str = "model") -> None:
        self.mechanism = mechanism
        self.noisy = noisy
        self.prior = prior

    def __call__(self, indices: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        noisy = self.noisy[indices]
        if self.prior == "model":
            log_prior = torch.log_softmax(logits.float(), dim=1)
        else:
            log_prior = torch.zeros_like(noisy)
        return self.mechanism.posterior_from_log_prior(noisy, log_prior)


@dataclass(frozen=True)
class AlibiOptions(MethodOptions):
    """Options of ``alibi``; see :class:`AlibiMethod`."""

    epsilon: float = option(kind=EPSILON, help="ε per label (replace one label)")
    noise: str = option(
        "laplace",
        kind=Choice(NOISES),
        flag="--alibi-noise",
        help="noise on the one-hot labels: laplace (pure ε-DP, the paper's) or gaussian "
        "((ε, δ)-DP, needs delta)",
    )
    delta: float | None = option(
        None, kind=DELTA, help="δ of the Gaussian noise", none="Laplace noise, pure ε-DP"
    )
    prior: str = option(
        "model",
        kind=Choice(PRIORS),
        flag="--alibi-prior",
        help="prior of the posterior: the current model's softmax or uniform",
    )
    secure_noise: bool = option(
        False, kind=SWITCH, help="draw the label noise from OS entropy instead of the run seed"
    )

    def validate(self) -> None:
        Alibi(self.epsilon, 2, noise=self.noise, delta=self.delta)  # noise and delta agree


class AlibiMethod(Method):
    """ALIBI (Malek et al. 2021).

    epsilon: ε > 0 per label. noise: "laplace" (pure ε-DP, the paper's) or "gaussian"
    ((ε, δ)-DP, needs ``delta``). prior: "model" or "uniform". secure_noise: OS entropy.
    """

    name: ClassVar[str] = "alibi"
    Options: ClassVar[type[MethodOptions]] = AlibiOptions

    def run(self, ctx: RunContext) -> MethodResult:
        labels = ctx.train.labels
        mechanism = Alibi(
            self.epsilon,
            ctx.train.info.num_classes,
            noise=self.noise,
            delta=self.delta,
            secure=self.secure_noise,
        )
        generator = None if self.secure_noise else ctx.generator(Stream.ALIBI_NOISE)
        noisy = ctx.privatized("alibi", lambda: mechanism.privatize(labels, generator))
        ledger = PrivacyLedger()
        ledger.record(mechanism.ledger_entry(examples=len(noisy), prior=self.prior))
        fit = ctx.fit(AlibiTargets(mechanism, noisy, self.prior))
        return MethodResult(fit=fit, ledger=ledger)
