"""Optional user-level DP for buffered aggregation (DP-FedBuff): clip, noise once per
flush, account without amplification.

Mechanism. Each client clips its flat update Δ to L2 norm C (:func:`clip_update`); the
server's staleness weight s(τ) ≤ 1 keeps the weighted update within C. The K weighted
updates of a flush are summed (:class:`~labeldp.fl.buffer.FixedPointBuffer`), and ONE
draw of N(0, (σC)²) per coordinate (:func:`flush_noise`) is added to that sum before it
is divided by the fixed K. The noise's standard deviation on the sum is σ·C whatever the
normalizer; σ is the noise multiplier (dimensionless, relative to C), C is in the units
of the model's parameters.

Accounting (:func:`user_level_epsilon`). Neighbouring datasets differ by one user: their
uploads are present, or contribute nothing (the schedule of trips is computed from timing
alone, so it is public and the same for both; this is the add/remove, or "zero-out",
relation of DP-FTRL, Kairouz et al. 2021, read by dp-accounting as ADD_OR_REMOVE_ONE).
Each flush a user takes part in is then one Gaussian mechanism of L2 sensitivity C with
noise σC; the flushes without them are the same function of the earlier (noised)
models in both worlds, so they cost nothing more (adaptive composition). With at most m
participations per user, the composition has RDP(α) = m·α/(2σ²), converted to (ε, δ) by
dp-accounting's RDP accountant (or its PLD accountant, tighter, on request). There is no
sampling, hence no amplification: a Poisson-amplified ε would only be a heuristic here
and must be labelled as one. Strictly, the buffer's fixed-point rounding can move a
contribution by up to √size·2^−(f+1) in L2 beyond C: with f from
:func:`~labeldp.fl.buffer.choose_frac_bits` (f = 57 for K = 10, C = 1) that is ~1e-15
for a million parameters: negligible (and inside the margin :func:`clip_updates` leaves
below C for the updates it scales).

What the simulator must enforce for this ε to hold: a client contributes at most once to
a flush (two uploads in one sum would be sensitivity 2C), and at most m times in all.
Under "replace one user" (rather than add/remove) the sensitivity per flush is 2C.
The user-level ε and a label-DP ε are guarantees for different neighbouring relations:
record both, never add them.

Units: ε in nats, δ a probability in (0, 1).
"""

from __future__ import annotations

import math

import dp_accounting
import torch

from ..errors import ConfigError, check_int
from ..mechanisms.randomness import check_source, standard_normal
from ..privacy.accountant import Accountant
from ..privacy.dpsgd_accounting import MIN_NOISE_MULTIPLIER
from ..privacy.neighbouring import Neighbouring

#: The relation :func:`user_level_epsilon` states ε for.
RELATION = Neighbouring.ONE_USER
#: Clipped updates are scaled to norm C·(1 − CLIP_MARGIN): room for float64's rounding of
#: the norm and of the scaling (relative errors ~1e-16·log(size)).
CLIP_MARGIN = 2.0**-20


def clip_update(delta: torch.Tensor, max_norm: float) -> tuple[torch.Tensor, bool]:
    """(Δ scaled to L2 norm ≤ C, whether it was scaled) for a client's flat update Δ
    (a 1-D real floating tensor); ``max_norm`` C: a finite number > 0. An update already
    within C comes back unchanged (a copy); see :func:`clip_updates`."""
    if not isinstance(delta, torch.Tensor) or delta.dim() != 1:
        raise ConfigError(f"delta must be a 1-D tensor (a flat update), got {_describe(delta)}")
    clipped, was_clipped = clip_updates(delta.unsqueeze(0), max_norm)
    return clipped[0], bool(was_clipped[0])


def clip_updates(deltas: torch.Tensor, max_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`clip_update` of every row of a 2-D tensor (one flat update per row): the
    clipped rows (same dtype and device) and a bool tensor of which rows were scaled.

    A row of norm ‖Δ‖₂ > C (computed in float64) is multiplied by C/‖Δ‖₂·(1 − CLIP_MARGIN)
    in float64 and cast back to its dtype rounding toward zero, so that no coordinate
    grows in the cast (half precision and subnormals included): the result's norm is ≤ C.
    Rows within C are left bit for bit as they are.
    """
    if not isinstance(deltas, torch.Tensor) or deltas.dim() != 2:
        raise ConfigError(
            f"deltas must be a 2-D tensor (one update per row), got {_describe(deltas)}"
        )
    if not deltas.is_floating_point():
        raise ConfigError(f"updates must be floating point, got {deltas.dtype}")
    check_max_norm(max_norm)
    wide = deltas.to(torch.float64)
    norms = torch.linalg.vector_norm(wide, dim=1)
    if not torch.isfinite(norms).all():
        raise ConfigError("updates must be finite (a NaN or infinite update cannot be clipped)")
    was_clipped = norms > max_norm
    factors = torch.where(was_clipped, max_norm / norms * (1.0 - CLIP_MARGIN), 1.0)
    scaled = _toward_zero(wide * factors.unsqueeze(1), deltas.dtype)
    return torch.where(was_clipped.unsqueeze(1), scaled, deltas), was_clipped


def _toward_zero(wide: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float64 ``wide`` cast to ``dtype`` rounding toward zero: no |coordinate| grows."""
    cast = wide.to(dtype)
    grew = cast.to(torch.float64).abs() > wide.abs()
    return torch.where(grew, torch.nextafter(cast, torch.zeros_like(cast)), cast)


def flush_noise(
    size: int,
    noise_multiplier: float,
    max_norm: float,
    generator: torch.Generator | None = None,
    *,
    secure: bool = False,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """The noise of one flush: ``size`` independent N(0, (σC)²) values, float64, to add
    ONCE to the K-sum of the flush's weighted, clipped updates, before dividing by K.

    noise_multiplier: σ ≥ 0 (0 gives zeros: clipping without noise, not private).
    max_norm: C, the L2 clip norm, finite > 0. generator: a seeded ``torch.Generator``
    (reproducible; private only while the seed is secret), or None with ``secure=True``
    for OS entropy (see :mod:`labeldp.mechanisms.randomness`).
    """
    check_int("size", size, 1)
    if isinstance(noise_multiplier, bool) or not (
        isinstance(noise_multiplier, (int, float))
        and math.isfinite(noise_multiplier)
        and noise_multiplier >= 0
    ):
        raise ConfigError(f"noise_multiplier must be a finite number ≥ 0, got {noise_multiplier!r}")
    check_max_norm(max_norm)
    check_source(generator, secure)
    noise = standard_normal((size,), generator=generator, secure=secure, device=device)
    return noise * (float(noise_multiplier) * float(max_norm))


def user_level_event(noise_multiplier: float, participations_cap: int) -> dp_accounting.DpEvent:
    """The DpEvent of a user's at most m = ``participations_cap`` ≥ 1 flushes, each a
    Gaussian mechanism of noise multiplier σ ≥ MIN_NOISE_MULTIPLIER (sensitivity C,
    noise σC): ``SelfComposedDpEvent(GaussianDpEvent(σ), m)``, under RELATION."""
    _check_noise(noise_multiplier)
    check_int("participations_cap", participations_cap, 1)
    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.GaussianDpEvent(float(noise_multiplier)), participations_cap
    )


def user_level_epsilon(
    noise_multiplier: float, participations_cap: int, delta: float, accountant: str = "rdp"
) -> float:
    """User-level ε (nats) at ``delta`` ∈ (0, 1) of at most m = ``participations_cap``
    participations with noise multiplier σ (see :func:`user_level_event`), no sampling
    and no amplification: RDP(α) = m·α/(2σ²) converted by dp-accounting ("rdp", the
    default), or the Gaussian's privacy loss distribution ("pld": tighter). Holds only if
    the simulator enforces at most one upload per user per flush and at most m in all.
    """
    if isinstance(delta, bool) or not (isinstance(delta, (int, float)) and 0 < delta < 1):
        raise ConfigError(f"delta must be a probability in (0, 1), got {delta!r}")
    event = user_level_event(noise_multiplier, participations_cap)
    return Accountant(RELATION, kind=accountant).compose(event).epsilon(delta)


def check_max_norm(max_norm: float) -> float:
    """``max_norm`` if it is a finite number > 0 (an L2 clip norm C); else ConfigError."""
    if isinstance(max_norm, bool) or not (
        isinstance(max_norm, (int, float)) and math.isfinite(max_norm) and max_norm > 0
    ):
        raise ConfigError(f"max_norm must be a finite number > 0 (an L2 norm), got {max_norm!r}")
    return max_norm


def _check_noise(noise_multiplier: float) -> None:
    if isinstance(noise_multiplier, bool) or not (
        isinstance(noise_multiplier, (int, float))
        and math.isfinite(noise_multiplier)
        and noise_multiplier >= MIN_NOISE_MULTIPLIER
    ):
        raise ConfigError(
            f"noise_multiplier must be a finite number ≥ {MIN_NOISE_MULTIPLIER:g} to be "
            f"accounted (below it ε is astronomically large), got {noise_multiplier!r}"
        )


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__
