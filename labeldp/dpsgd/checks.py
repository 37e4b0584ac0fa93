"""Argument checks of :mod:`labeldp.dpsgd`: each refusal is a ConfigError that names the
parameter, its allowed range and the value given.

Units: ``max_grad_norm`` C is an L2 norm per example (over all parameters together);
``noise_multiplier`` σ is dimensionless (the noise's standard deviation per coordinate of
the summed gradient is σ·C, per step); ``target_epsilon`` / ``max_epsilon`` are ε in nats
for the relation "add or remove one example"; ``delta`` δ is a probability in (0, 1).
"""

from __future__ import annotations

import math

from ..errors import ConfigError
from ..privacy.dpsgd_accounting import ACCOUNTANTS

LOSS_REDUCTIONS = ("mean", "sum")


def check_positive(name: str, value: object) -> float:
    """A finite number > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be a finite number > 0, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def check_noise_multiplier(value: object) -> float:
    """σ ≥ 0 (σ = 0: clipping without noise, not private)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"noise_multiplier must be a finite number ≥ 0, got {value!r}")
    if not (math.isfinite(value) and value >= 0):
        raise ConfigError(f"noise_multiplier must be a finite number ≥ 0, got {value!r}")
    return float(value)


def check_delta(value: object) -> float:
    """δ in (0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ConfigError(f"delta must be a number in (0, 1), got {value!r}")
    return float(value)


def check_choice(name: str, value: object, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ConfigError(
            f"{name} must be one of {', '.join(repr(a) for a in allowed)}, got {value!r}"
        )
    return value  # type: ignore[return-value]


def check_accountant(value: object) -> str:
    return check_choice("accountant", value, ACCOUNTANTS)


def check_loss_reduction(value: object) -> str:
    return check_choice("loss_reduction", value, LOSS_REDUCTIONS)


def check_seed(seed: object, secure_noise: bool) -> int | None:
    """None or an integer ≥ 0; refused with ``secure_noise`` (OS entropy has no seed)."""
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed must be None or an integer ≥ 0, got {seed!r}")
    if secure_noise:
        raise ConfigError(
            "seed must be None when secure_noise=True (secure noise comes from OS entropy "
            "and cannot be seeded)"
        )
    return seed
