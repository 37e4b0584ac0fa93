"""ALIBI: additive noise on one-hot labels plus Bayesian inference (Malek, Mironov,
Prasad, Shilov, Tramèr, NeurIPS 2021)."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import dp_accounting
import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..privacy.events import pure_dp_event
from .base import LabelMechanism
from .randomness import check_source, standard_laplace, standard_normal
from .validation import check_epsilon, check_labels, check_num_classes, check_prior

NOISES = ("laplace", "gaussian")
L1_SENSITIVITY = 2.0  # one label change moves the one-hot vector by L1 distance 2
L2_SENSITIVITY = math.sqrt(2.0)  # ... and by L2 distance √2


def gaussian_sigma(epsilon: float, delta: float) -> float:
    """Smallest per-coordinate standard deviation s such that adding N(0, s²) to a one-hot
    label is (ε, δ)-label-DP: the analytic Gaussian mechanism (Balle & Wang 2018), as
    computed by dp-accounting for sensitivity 1, times the L2 sensitivity √2."""
    unit = dp_accounting.get_sigma_gaussian(epsilon, delta)
    return L2_SENSITIVITY * unit * (1 + 1e-9)  # the root finder's tolerance, on the safe side


class Alibi(LabelMechanism):
    """Adds i.i.d. noise to each coordinate of the one-hot label, once per example; the
    training targets are the posterior over the true class (post-processing, free).

    epsilon: ε > 0, finite, per example.
    num_classes: K ≥ 2.
    noise: "laplace" (pure ε-DP; scale b = 2/ε, per-coordinate standard deviation √2·b)
        or "gaussian" ((ε, δ)-DP; standard deviation s calibrated exactly by the analytic
        Gaussian mechanism for L2 sensitivity √2).
    delta: δ in (0, 1) for "gaussian"; must be None (or 0) for "laplace".
    secure: draw from OS entropy (see :mod:`labeldp.mechanisms.randomness`).
    """

    name: ClassVar[str] = "alibi"

    def __init__(
        self,
        epsilon: float,
        num_classes: int,
        noise: str = "laplace",
        delta: float | None = None,
        secure: bool = False,
    ) -> None:
        self.epsilon = check_epsilon(epsilon)
        self.num_classes = check_num_classes(num_classes)
        if noise not in NOISES:
            raise ConfigError(f"noise must be one of {', '.join(NOISES)}, got {noise!r}")
        self.noise = noise
        self.secure = bool(secure)
        if noise == "laplace":
            if delta not in (None, 0, 0.0):
                raise ConfigError(f"delta must be None for Laplace noise (pure ε-DP), got {delta}")
            self.delta = 0.0
            self.scale = L1_SENSITIVITY / self.epsilon  # b
        else:
            if delta is None or not (0 < delta < 1):
                raise ConfigError(f"delta must be in (0, 1) for Gaussian noise, got {delta}")
            self.delta = float(delta)
            self.scale = gaussian_sigma(self.epsilon, self.delta)  # s

    @property
    def noise_std(self) -> float:
        """Per-coordinate standard deviation of the noise: √2·b (Laplace) or s (Gaussian)."""
        return math.sqrt(2.0) * self.scale if self.noise == "laplace" else self.scale

    def dp_event(self) -> dp_accounting.DpEvent:
        """Gaussian: ``GaussianDpEvent(√2·s)``, exact. Replacing the label moves the
        one-hot mean by √2 (L2) and the noise is isotropic with standard deviation s, so
        the mechanism is the Gaussian mechanism of sensitivity √2; dp-accounting's PLD
        accountant reads ``GaussianDpEvent(m)`` under REPLACE_ONE as a move of 2 at
        standard deviation m, the same ratio for m = 2s/√2 = √2·s.

        Laplace: binary RR at ε (:func:`~labeldp.privacy.events.pure_dp_event`), which
        dominates this pure ε-DP mechanism (ε = 2/b). dp-accounting's PLD accountant has
        no Laplace event under REPLACE_ONE (the exact one would be two Laplace
        mechanisms of sensitivity 1 and scale b, the two coordinates that change)."""
        if self.noise == "gaussian":
            return dp_accounting.GaussianDpEvent(math.sqrt(2.0) * self.scale)
        return pure_dp_event(self.epsilon)

    def event_note(self) -> str:
        if self.noise == "gaussian":
            return "exact: Gaussian mechanism, L2 sensitivity √2, read under REPLACE_ONE"
        return (
            "dominating pair, not exact: binary randomized response at ε = 2/b bounds "
            "every ε-DP mechanism; dp-accounting has no Laplace event under REPLACE_ONE"
        )

    def details(self) -> dict[str, Any]:
        return {
            "noise": self.noise,
            "scale": self.scale,
            "noise_std": self.noise_std,
            "num_classes": self.num_classes,
            "secure": self.secure,
            "calibration": "ε = 2/b"
            if self.noise == "laplace"
            else "analytic Gaussian mechanism, L2 sensitivity √2 "
            "(dp_accounting.get_sigma_gaussian)",
        }

    def privatize(
        self, labels: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """onehot(label) + noise for each label: float32 (N, K) on the labels' device."""
        labels = check_labels(labels, self.num_classes)
        check_source(generator, self.secure)
        shape = (labels.shape[0], self.num_classes)
        draw = standard_laplace if self.noise == "laplace" else standard_normal
        noise = draw(shape, generator=generator, secure=self.secure, device=labels.device)
        return (F.one_hot(labels, self.num_classes).double() + self.scale * noise).float()

    def log_likelihood(self, noisy: torch.Tensor) -> torch.Tensor:
        """log Pr[noisy | true class k] up to a per-row constant, (N, K).

        Laplace: −‖ỹ − e_k‖₁ / b = (|ỹ_k| − |ỹ_k − 1|) / b − Σ_j |ỹ_j| / b.
        Gaussian: −‖ỹ − e_k‖₂² / (2s²) = ỹ_k / s² − (‖ỹ‖² + 1) / (2s²).
        """
        noisy = noisy.float()
        if self.noise == "laplace":
            return (noisy.abs() - (noisy - 1).abs()) / self.scale
        return noisy / self.scale**2

    def posterior_from_log_prior(
        self, noisy: torch.Tensor, log_prior: torch.Tensor
    ) -> torch.Tensor:
        """P(k | ỹ) ∝ prior_k · Pr[ỹ | k], from log prior (N, K); rows sum to 1. Unchecked:
        for the training loop, which passes ``log_softmax`` of the model's logits."""
        return torch.softmax(log_prior.float() + self.log_likelihood(noisy), dim=1)

    def posterior(self, noisy: torch.Tensor, prior: torch.Tensor | None = None) -> torch.Tensor:
        """P(true class = k | ỹ), float32 (N, K), rows summing to 1.

        noisy: (N, K) as returned by :meth:`privatize`. prior: (N, K) rows of a probability
        distribution, or None for uniform (the MAP-without-prior variant)."""
        if (
            not isinstance(noisy, torch.Tensor)
            or noisy.dim() != 2
            or noisy.shape[1] != self.num_classes
        ):
            raise ConfigError(f"noisy must be a float tensor (N, {self.num_classes})")
        if prior is None:
            log_prior = torch.zeros_like(noisy, dtype=torch.float32)
        else:
            prior = check_prior(prior, noisy.shape[0])
            if prior.shape[1] != self.num_classes:
                raise ConfigError(
                    f"prior must have {self.num_classes} columns, got {prior.shape[1]}"
                )
            log_prior = torch.log(prior.float())
        return self.posterior_from_log_prior(noisy, log_prior)
