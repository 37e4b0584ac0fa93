"""Staleness weights s(τ) of buffered asynchronous aggregation (FedBuff, FedAsync).

A client downloads the model at server version v and uploads its update Δ; the server,
now at version t, adds s(τ)·Δ to its buffer, where τ = t − v ≥ 0 is the number of server
steps taken since the DOWNLOAD (not since the upload was received). Kinds:

- "constant": s(τ) = 1.
- "polynomial": s(τ) = (1 + τ)^−a, a = ``exponent`` (FedBuff's default is a = 0.5,
  1/√(1 + τ); a = 0 is "constant").
- "hinge" (Xie et al. 2019, FedAsync): s(τ) = 1 for τ ≤ b, else 1/(a·(τ − b) + 1), with
  slope a = ``exponent`` and b = ``limit``.

Every weight lies in (0, 1]: capped at 1, and the ranges of the parameters keep it from
underflowing to 0 for any τ an int64 holds. Weights ≤ 1 matter for user-level DP: a
weighted, clipped update still has L2 norm ≤ C (see :mod:`labeldp.fl.user_dp`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError, check_int

KINDS = ("constant", "polynomial", "hinge")
#: Largest polynomial exponent: (1 + τ)^−15 ≥ 2^−960 even for τ = 2^64 − 1, a NORMAL
#: float64 (≥ 2^−1022), so it stays > 0 when denormals are flushed to zero, as every run
#: does (:func:`labeldp.provenance.cpu_numerics`).
MAX_EXPONENT = 15.0
#: Largest hinge slope: a·τ stays far below float64's range for any int64 τ.
MAX_SLOPE = 1e6


@dataclass(frozen=True)
class StalenessWeight:
    """The weight s(τ) of an update of staleness τ (server steps since its download).

    kind: one of KINDS. exponent: the polynomial's a in [0, MAX_EXPONENT], or the hinge's
    slope a in [0, MAX_SLOPE] (ignored by "constant"). limit: the hinge's b, an integer
    ≥ 0: updates at most b steps stale get weight 1 (ignored by the other kinds).

    >>> StalenessWeight()(3)
    0.5
    >>> StalenessWeight("hinge", exponent=10, limit=4)(np.array([0, 4, 5])).tolist()
    [1.0, 1.0, 0.09090909090909091]
    """

    kind: str = "polynomial"
    exponent: float = 0.5
    limit: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        highest = MAX_SLOPE if self.kind == "hinge" else MAX_EXPONENT
        if (
            isinstance(self.exponent, bool)
            or not isinstance(self.exponent, (int, float))
            or not (math.isfinite(self.exponent) and 0 <= self.exponent <= highest)
        ):
            raise ConfigError(
                f"exponent must be a number in [0, {highest:g}] for kind {self.kind!r}, "
                f"got {self.exponent!r}"
            )
        check_int("limit", self.limit, 0)

    def __call__(self, tau: int | np.ndarray) -> float | np.ndarray:
        """s(τ) for an integer τ ≥ 0 (a float), or elementwise for a numpy integer array
        (a float64 array of its shape). ConfigError for a negative or non-integer τ."""
        steps = np.asarray(tau)
        if steps.dtype.kind not in "iu":
            raise ConfigError(
                f"staleness tau must be an integer or an integer array (server steps), "
                f"got {type(tau).__name__} of dtype {steps.dtype}"
            )
        if steps.size and steps.min() < 0:
            raise ConfigError(
                f"staleness tau must be ≥ 0 (server version at aggregation minus version at "
                f"download), got {steps.min()}"
            )
        t = steps.astype(np.float64)
        if self.kind == "constant":
            weights = np.ones_like(t)
        elif self.kind == "polynomial":
            weights = (1.0 + t) ** -float(self.exponent)
        else:
            over = np.maximum(t - self.limit, 0.0)
            weights = 1.0 / (float(self.exponent) * over + 1.0)
        weights = np.minimum(weights, 1.0)
        return float(weights) if weights.ndim == 0 else weights
