"""How long a client's trip takes on the virtual clock: named distributions × client speed.

A trip's duration (download, local training, upload) is drawn from a named distribution
with the given ``mean`` (virtual time units; only ratios of times matter), times an
optional persistent per-client speed factor (lognormal with median 1: some devices are
always slow) and optionally times the client's data size over the mean size (training
time grows with the data). Durations are never zero or negative: the distributions that
reach 0 (exponential, half-normal) are floored at ``minimum`` (> 0, default mean/1000),
and a configuration that could give 0 (a uniform range starting at 0) is refused.

Kinds, with ``mean`` = m and ``spread`` = s:

- "constant": every trip takes m.
- "exponential": Exp with mean m (FedBuff's and FLSim's default shape).
- "half-normal": |N(0, σ²)| with σ = m·√(π/2), so its mean is m.
- "lognormal": exp(N(μ, s²)) with μ = log m − s²/2, so its mean is m (s > 0).
- "uniform": U(m(1 − s), m(1 + s)) with 0 ≤ s < 1 (s = 1 would reach 0: refused).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError

KINDS = ("constant", "exponential", "half-normal", "lognormal", "uniform")


@dataclass(frozen=True)
class Durations:
    """A trip-duration distribution (see the module docstring).

    kind: one of ``KINDS``. mean: the distribution's mean, virtual time units (> 0).
    spread: lognormal σ (> 0) or the uniform half-width as a fraction of the mean
    (0 ≤ s < 1); ignored by the other kinds. speed_sigma: σ of the per-client lognormal
    speed factor (0: all clients equally fast). scale_by_size: multiply by the client's
    size over the mean client size. minimum: the floor of every duration (> 0; default
    mean/1000).
    """

    kind: str = "exponential"
    mean: float = 1.0
    spread: float = 0.5
    speed_sigma: float = 0.0
    scale_by_size: bool = False
    minimum: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"duration kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if not (isinstance(self.mean, (int, float)) and math.isfinite(self.mean) and self.mean > 0):
            raise ConfigError(f"duration mean must be a finite number > 0, got {self.mean!r}")
        if self.kind == "lognormal" and not (math.isfinite(self.spread) and self.spread > 0):
            raise ConfigError(
                f"lognormal spread (σ) must be a finite number > 0, got {self.spread!r}"
            )
        if self.kind == "uniform" and not (0 <= self.spread < 1):
            raise ConfigError(
                f"uniform spread must lie in [0, 1) (the range m(1−s)..m(1+s) must stay above "
                f"0), got {self.spread!r}"
            )
        if not (math.isfinite(self.speed_sigma) and self.speed_sigma >= 0):
            raise ConfigError(f"speed_sigma must be a finite number ≥ 0, got {self.speed_sigma!r}")
        if self.minimum is not None and not (math.isfinite(self.minimum) and self.minimum > 0):
            raise ConfigError(
                f"duration minimum must be a finite number > 0 (durations are never zero), "
                f"got {self.minimum!r}"
            )

    @property
    def floor(self) -> float:
        return self.minimum if self.minimum is not None else self.mean / 1000.0

    def draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """n base durations (float64, ≥ the floor), before speed and size factors."""
        m, s = float(self.mean), float(self.spread)
        if self.kind == "constant":
            out = np.full(n, m)
        elif self.kind == "exponential":
            out = rng.exponential(m, n)
        elif self.kind == "half-normal":
            out = np.abs(rng.normal(0.0, m * math.sqrt(math.pi / 2), n))
        elif self.kind == "lognormal":
            out = rng.lognormal(math.log(m) - s * s / 2, s, n)
        else:
            out = rng.uniform(m * (1 - s), m * (1 + s), n)
        return np.maximum(out, self.floor)

    def client_factors(self, rng: np.random.Generator, sizes: np.ndarray) -> np.ndarray | None:
        """Each client's persistent duration factor (speed × size), or None when all are 1."""
        factor = None
        if self.speed_sigma > 0:
            factor = rng.lognormal(0.0, self.speed_sigma, len(sizes))
        if self.scale_by_size:
            size_factor = np.asarray(sizes, dtype=np.float64) / float(np.mean(sizes))
            factor = size_factor if factor is None else factor * size_factor
        return factor
