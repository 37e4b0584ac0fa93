"""Privacy accounting of DP-SGD through dp-accounting: ε for given noise, noise for given ε.

DP-SGD (Abadi et al. 2016) as run by :class:`labeldp.train.dpsgd.DPSGDStep` is the
``steps``-fold composition of one Poisson-subsampled Gaussian mechanism: every example
enters each step's batch independently with probability ``sample_rate`` q, the sum of the
clipped per-example gradients (L2 sensitivity C) gets Gaussian noise of standard deviation
σ·C, where σ is the *noise multiplier* (dimensionless, per step, relative to C).

The neighbouring relation is add/remove one example (the DP-SGD convention, and the
relation of Opacus and of the reference numbers). It protects features and labels alike.
Changing one *label* is a replacement, which group privacy bounds by (2ε, (1 + e^ε)·δ);
:func:`replace_one_bound` gives that bound and the ledger records it beside ε.

Accountants: "pld" (privacy loss distributions, the default: tight up to discretization)
or "rdp" (Rényi DP, a few per cent to ~15 % looser in ε). Both come from dp-accounting;
this module only builds the event, validates arguments and calibrates.
"""

from __future__ import annotations

import logging
import math

import dp_accounting

from ..errors import ConfigError

ACCOUNTANTS = ("pld", "rdp")
#: PLD discretization of the privacy loss (nats); 1e-4 keeps ε within ~1e-3 of exact.
PLD_DISCRETIZATION = 1e-4


def _check(noise_multiplier: float | None, sample_rate: float, steps: int, delta: float) -> None:
    if noise_multiplier is not None and not (
        math.isfinite(noise_multiplier) and noise_multiplier > 0
    ):
        raise ConfigError(f"noise_multiplier must be a finite number > 0, got {noise_multiplier}")
    if not 0 < sample_rate <= 1:
        raise ConfigError(f"sample_rate must be in (0, 1], got {sample_rate}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps must be an integer ≥ 1, got {steps!r}")
    if not 0 < delta < 1:
        raise ConfigError(f"delta must be in (0, 1), got {delta}")


def _accountant(accountant: str) -> dp_accounting.PrivacyAccountant:
    if accountant == "pld":
        return dp_accounting.pld.PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)
    if accountant == "rdp":
        return dp_accounting.rdp.RdpAccountant()
    raise ConfigError(f"accountant must be one of {', '.join(ACCOUNTANTS)}, got {accountant!r}")


def dpsgd_event(noise_multiplier: float, sample_rate: float, steps: int) -> dp_accounting.DpEvent:
    """The DpEvent of DP-SGD: ``steps`` compositions of the Gaussian mechanism with noise
    multiplier σ, each on a Poisson sample of rate q (q = 1: no sampling)."""
    gaussian = dp_accounting.GaussianDpEvent(noise_multiplier)
    step = (
        gaussian if sample_rate == 1 else dp_accounting.PoissonSampledDpEvent(sample_rate, gaussian)
    )
    return dp_accounting.SelfComposedDpEvent(step, steps)


def dpsgd_epsilon(
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    accountant: str = "pld",
) -> float:
    """ε (add/remove one example) of DP-SGD after ``steps`` steps.

    noise_multiplier: σ > 0, noise standard deviation per step divided by the clipping
        norm C. sample_rate: q in (0, 1], the Poisson sampling probability per example and
        step (expected batch size / N). steps: T ≥ 1 optimizer steps. delta: δ in (0, 1).
    accountant: "pld" (default) or "rdp".
    """
    _check(noise_multiplier, sample_rate, steps, delta)
    acc = _accountant(accountant)
    # RDP logs a warning for each Rényi order whose series does not converge and is left
    # out (which can only make ε larger, never smaller); keep that out of users' output.
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        acc.compose(dpsgd_event(noise_multiplier, sample_rate, steps))
        return float(acc.get_epsilon(delta))
    finally:
        absl.setLevel(level)


def calibrate_dpsgd_noise(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "pld",
    rel_tol: float = 1e-3,
) -> float:
    """The smallest noise multiplier σ (to within ``rel_tol`` in ε) whose DP-SGD ε is at
    most ``target_epsilon``: the result's ε lies in [(1 − rel_tol)·target, target].

    target_epsilon: ε > 0 (add/remove one example). Other arguments as in
    :func:`dpsgd_epsilon`. False position on σ (ε is decreasing in σ).
    """
    _check(None, sample_rate, steps, delta)
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise ConfigError(f"target_epsilon must be a finite number > 0, got {target_epsilon}")
    if not 0 < rel_tol < 1:
        raise ConfigError(f"rel_tol must be in (0, 1), got {rel_tol}")

    def eps(sigma: float) -> float:
        return dpsgd_epsilon(sigma, sample_rate, steps, delta, accountant)

    # A bracket low < high with eps(high) ≤ target < eps(low). For PLD, the RDP
    # calibration is a cheap upper end (RDP's ε is never below PLD's).
    if accountant == "pld":
        high = calibrate_dpsgd_noise(target_epsilon, delta, sample_rate, steps, "rdp", rel_tol)
    else:
        _accountant(accountant)
        high = 1.0
        while eps(high) > target_epsilon:
            high *= 2
            if high > 1e6:
                raise ConfigError(
                    f"no noise multiplier ≤ 1e6 reaches ε = {target_epsilon} at δ = {delta}; "
                    "raise target_epsilon or delta"
                )
    e_high = eps(high)
    low = high
    while True:
        low /= 1.25
        e_low = eps(low)
        if e_low > target_epsilon:
            break
        high, e_high = low, e_low
    # Illinois false position on ε(σ) − target; f_low / f_high are the interpolation
    # values (halved on a stuck side), e_high the true ε at ``high`` that decides when to stop.
    f_low, f_high = e_low, e_high
    side = 0
    while e_high < (1 - rel_tol) * target_epsilon and high - low > 1e-9 * high:
        mid = high - (f_high - target_epsilon) * (high - low) / (f_high - f_low)
        mid = min(max(mid, low + 1e-3 * (high - low)), high - 1e-3 * (high - low))
        e_mid = eps(mid)
        if e_mid > target_epsilon:
            low, e_low, f_low = mid, e_mid, e_mid
            if side == -1:
                f_high = target_epsilon + (f_high - target_epsilon) / 2
            side = -1
        else:
            high, e_high, f_high = mid, e_mid, e_mid
            if side == 1:
                f_low = target_epsilon + (f_low - target_epsilon) / 2
            side = 1
    return high


def replace_one_bound(epsilon: float, delta: float) -> tuple[float, float]:
    """(ε′, δ′) for replacing one example (e.g. changing one label) implied by an
    (ε, δ) add/remove guarantee through group privacy of size 2: (2ε, (1 + e^ε)·δ)."""
    return 2 * epsilon, (1 + math.exp(epsilon)) * delta
