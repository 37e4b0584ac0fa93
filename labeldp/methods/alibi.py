"""ALIBI: Laplace (or Gaussian) noise on one-hot labels, once per example, and training
on the Bayesian posterior recomputed every step with the current model as the prior."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from ..errors import ConfigError
from ..mechanisms import Alibi
from ..mechanisms.validation import check_epsilon
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


class AlibiMethod(Method):
    """ALIBI (Malek et al. 2021).

    epsilon: ε > 0 per label. noise: "laplace" (pure ε-DP, the paper's) or "gaussian"
    ((ε, δ)-DP, needs ``delta``). prior: "model" or "uniform". secure_noise: OS entropy.
    """

    name: ClassVar[str] = "alibi"

    def __init__(
        self,
        epsilon: float,
        noise: str = "laplace",
        delta: float | None = None,
        prior: str = "model",
        secure_noise: bool = False,
    ) -> None:
        self.epsilon = check_epsilon(epsilon)
        if prior not in PRIORS:
            raise ConfigError(f"prior must be one of {', '.join(PRIORS)}, got {prior!r}")
        self.noise, self.delta, self.prior = noise, delta, prior
        self.secure_noise = bool(secure_noise)
        Alibi(self.epsilon, 2, noise=noise, delta=delta)  # validates noise and delta now

    def options(self) -> dict[str, Any]:
        return {
            "epsilon": self.epsilon,
            "noise": self.noise,
            "delta": self.delta,
            "prior": self.prior,
            "secure_noise": self.secure_noise,
        }

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
