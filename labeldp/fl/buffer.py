"""The aggregation buffer as secure aggregation would compute it: fixed-point integers.

Each client contribution (already clipped and weighted by s(τ) ≤ 1 at the client) is
encoded as integers round(v·2^f) mod 2^b, and the buffer only adds residues mod 2^b, as a
secure-aggregation protocol over Z_{2^b} would; only the decoded sum of the K
contributions leaves it. Integer addition is exact, associative and commutative, so any
split of the work (local chunks, remote workers, any order of merging) gives a
bit-identical sum, and the decoded sum differs from the exact real sum of the
contributions by at most K·2^−f/2 per coordinate (each encoding rounds by ≤ 2^−f/2),
plus float64's rounding of the result.

No sum can wrap around: each encoded coordinate is clamped to the per-contribution bound
(2^(b−1) − 1) // K, so the K-sum stays in the signed range (−2^(b−1), 2^(b−1)). Clamped
coordinates are counted (``overflows``); with ``frac_bits`` from :func:`choose_frac_bits`
for an L2 clip norm C none occur, since every coordinate of a clipped update is ≤ C.

Units: ``frac_bits`` f and ``total_bits`` b are bits; values and sums are in the units of
the model's parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import torch

from ..errors import ConfigError, check_int

#: At most 62 bits, so the sum of two residues (< 2^63) never overflows an int64.
MAX_TOTAL_BITS = 62
#: At most 1023 fractional bits, so 2^f is a finite float64.
MAX_FRAC_BITS = 1023


@dataclass(frozen=True)
class FixedPoint:
    """Fixed-point numbers with ``frac_bits`` f ∈ [0, 1023] fractional bits in residues
    mod 2^b, ``total_bits`` b ∈ [1, 62]; the residues r ≥ 2^(b−1) stand for r − 2^b.

    >>> fp = FixedPoint(frac_bits=4, total_bits=8)
    >>> fp.decode(fp.add(fp.encode(torch.tensor([1.5])), fp.encode(torch.tensor([-2.0]))))
    tensor([-0.5000], dtype=torch.float64)
    """

    frac_bits: int
    total_bits: int = MAX_TOTAL_BITS

    def __post_init__(self) -> None:
        check_int("frac_bits", self.frac_bits, 0)
        if self.frac_bits > MAX_FRAC_BITS:
            raise ConfigError(f"frac_bits must be in [0, {MAX_FRAC_BITS}], got {self.frac_bits}")
        check_int("total_bits", self.total_bits, 1)
        if self.total_bits > MAX_TOTAL_BITS:
            raise ConfigError(
                f"total_bits must be in [1, {MAX_TOTAL_BITS}] (two residues must add without "
                f"overflowing an int64), got {self.total_bits}"
            )

    @property
    def modulus(self) -> int:
        """2^b."""
        return 1 << self.total_bits

    @property
    def max_magnitude(self) -> int:
        """2^(b−1) − 1: the largest |integer| the signed range holds."""
        return (1 << (self.total_bits - 1)) - 1

    def quantize(self, values: torch.Tensor, bound: int | None = None) -> tuple[torch.Tensor, int]:
        """(round(v·2^f) clamped to [−bound, bound] as int64, how many were clamped) for
        finite real ``values``; ``bound`` in [0, max_magnitude], max_magnitude if None.
        Rounds half to even."""
        bound = self.max_magnitude if bound is None else bound
        if isinstance(bound, bool) or not isinstance(bound, int):
            raise ConfigError(f"bound must be an integer, got {bound!r}")
        if not 0 <= bound <= self.max_magnitude:
            raise ConfigError(f"bound must be in [0, {self.max_magnitude}], got {bound}")
        if (
            not isinstance(values, torch.Tensor)
            or values.is_complex()
            or values.dtype == torch.bool
        ):
            raise ConfigError(f"values must be a real tensor, got {_describe(values)}")
        if not torch.isfinite(values).all():
            raise ConfigError("values must be finite (a NaN or infinite update cannot be summed)")
        # v·2^f may still overflow to ±inf: clamped like any other value out of range
        scaled = torch.round(values.to(torch.float64) * math.ldexp(1.0, self.frac_bits))
        # within ±2^62 in float64 (exact), so the int64 conversion is safe; then the bound
        integers = scaled.clamp(-(2.0**62), 2.0**62).to(torch.int64)
        clamped = integers.abs() > bound
        return integers.clamp(-bound, bound), int(clamped.sum())

    def encode(self, values: torch.Tensor) -> torch.Tensor:
        """round(v·2^f) mod 2^b as int64 residues in [0, 2^b), for finite ``values``; a
        value beyond the signed range is clamped to ±(2^(b−1) − 1) first."""
        return torch.remainder(self.quantize(values)[0], self.modulus)

    def add(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """(a + b) mod 2^b for int64 residues in [0, 2^b) of one shape."""
        self._check_residues("a", a)
        self._check_residues("b", b)
        if a.shape != b.shape:
            raise ConfigError(f"residues of shapes {tuple(a.shape)} and {tuple(b.shape)} differ")
        return torch.remainder(a + b, self.modulus)

    def decode(self, residues: torch.Tensor) -> torch.Tensor:
        """The real numbers (float64) that int64 ``residues`` in [0, 2^b) stand for: r − 2^b
        for r ≥ 2^(b−1), then divided by 2^f (rounded to the nearest float64 beyond 2^53)."""
        self._check_residues("residues", residues)
        signed = torch.where(residues > self.max_magnitude, residues - self.modulus, residues)
        return signed.to(torch.float64) * math.ldexp(1.0, -self.frac_bits)

    def _check_residues(self, name: str, residues: torch.Tensor) -> None:
        if not isinstance(residues, torch.Tensor) or residues.dtype != torch.int64:
            raise ConfigError(
                f"{name} must be an int64 tensor of residues, got {_describe(residues)}"
            )
        if residues.numel() and (residues.min() < 0 or residues.max() >= self.modulus):
            raise ConfigError(f"{name} must hold residues in [0, 2^{self.total_bits})")


class FixedPointBuffer:
    """The fixed-point sum of at most ``capacity`` K contributions of ``size`` values.

    fixed_point: the encoding (a :class:`FixedPoint`). capacity: K ≥ 1, at most
    2^(b−1) − 1 (each contribution needs an integer bound ≥ 1). device: where the integer
    sum lives. ``bound`` = (2^(b−1) − 1) // K is the largest |encoded coordinate| of one
    contribution; ``count`` the contributions added so far; ``overflows`` the encoded
    coordinates clamped to ``bound`` so far.
    """

    def __init__(
        self,
        size: int,
        fixed_point: FixedPoint,
        capacity: int,
        device: torch.device | str = "cpu",
    ) -> None:
        self.size = check_int("size", size, 1)
        if not isinstance(fixed_point, FixedPoint):
            raise ConfigError(f"fixed_point must be a FixedPoint, got {_describe(fixed_point)}")
        self.fixed_point = fixed_point
        self.capacity = check_int("capacity", capacity, 1)
        _check_capacity(capacity, fixed_point)
        self.bound = fixed_point.max_magnitude // capacity
        self.device = torch.device(device)
        self.reset()

    def reset(self) -> None:
        """Empties the buffer (sum, count and overflows back to 0)."""
        self._sum = torch.zeros(self.size, dtype=torch.int64, device=self.device)
        self.count = 0
        self.overflows = 0

    def add(self, values: torch.Tensor) -> None:
        """Adds one contribution (a 1-D real tensor of ``size`` finite values) or several
        (a 2-D tensor, one per row); ConfigError beyond ``capacity``."""
        if not isinstance(values, torch.Tensor) or values.dim() not in (1, 2):
            raise ConfigError(f"values must be a 1-D or 2-D tensor, got {_describe(values)}")
        if values.shape[-1] != self.size:
            raise ConfigError(
                f"a contribution must hold size={self.size} values, got shape {tuple(values.shape)}"
            )
        rows = values if values.dim() == 2 else values.unsqueeze(0)
        self._reserve(rows.shape[0])
        integers, overflows = self.fixed_point.quantize(rows.to(self.device), self.bound)
        # at most K rows of |x| ≤ bound: the plain int64 sum stays within ±(2^(b−1) − 1)
        partial = torch.remainder(integers.sum(dim=0), self.fixed_point.modulus)
        self._sum = self.fixed_point.add(self._sum, partial)
        self.count += rows.shape[0]
        self.overflows += overflows

    def merge(self, other: FixedPointBuffer) -> None:
        """Adds another buffer's partial sum (same size, encoding and capacity), with its
        count and overflows; ConfigError if the counts together exceed ``capacity``."""
        if not isinstance(other, FixedPointBuffer):
            raise ConfigError(f"can merge only a FixedPointBuffer, got {_describe(other)}")
        mine = (self.size, self.fixed_point, self.capacity)
        theirs = (other.size, other.fixed_point, other.capacity)
        if mine != theirs:
            raise ConfigError(
                f"buffers differ in (size, fixed_point, capacity): {mine} and {theirs}"
            )
        self._reserve(other.count)
        self._sum = self.fixed_point.add(self._sum, other._sum.to(self.device))
        self.count += other.count
        self.overflows += other.overflows

    def residues(self) -> torch.Tensor:
        """A copy of the integer sum: int64 residues mod 2^b, what secure aggregation
        would reveal."""
        return self._sum.clone()

    def total(self) -> torch.Tensor:
        """The decoded sum of the contributions so far, float64, shape (size,)."""
        return self.fixed_point.decode(self._sum)

    def state_dict(self) -> dict[str, object]:
        """The integer sum, count and overflows (for a checkpoint)."""
        return {"sum": self._sum.clone(), "count": self.count, "overflows": self.overflows}

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restores :meth:`state_dict` (same size, encoding and capacity)."""
        residues = state["sum"]
        if not isinstance(residues, torch.Tensor) or residues.shape != (self.size,):
            raise ConfigError(f"a buffer state must hold {self.size} residues")
        self.fixed_point._check_residues("sum", residues)
        self._sum = residues.to(self.device, torch.int64).clone()
        self.count = int(state["count"])
        self.overflows = int(state["overflows"])

    def _reserve(self, more: int) -> None:
        if self.count + more > self.capacity:
            raise ConfigError(
                f"the buffer holds at most capacity={self.capacity} contributions: "
                f"{self.count} + {more} would exceed it (take total() and reset() first)"
            )


def choose_frac_bits(capacity: int, bound: float, total_bits: int = MAX_TOTAL_BITS) -> int:
    """The largest f in [0, 1023] with K·bound·2^f < 2^(b−1) whose encoding of ±bound is
    not clamped by :class:`FixedPointBuffer` (round(bound·2^f) ≤ (2^(b−1) − 1) // K): no
    contribution whose coordinates are at most ``bound`` in magnitude (a clipped update:
    ``bound`` = its L2 clip norm C) ever overflows.

    capacity: K ≥ 1. bound: a finite number > 0. total_bits: b in [1, 62]. ConfigError
    when even f = 0 fails (the bound is too large for K and b).

    >>> choose_frac_bits(capacity=10, bound=1.0)
    57
    """
    check_int("capacity", capacity, 1)
    if (
        isinstance(bound, bool)
        or not isinstance(bound, (int, float))
        or not (math.isfinite(bound) and bound > 0)
    ):
        raise ConfigError(f"bound must be a finite number > 0, got {bound!r}")
    fixed_point = FixedPoint(0, total_bits)  # validates total_bits
    _check_capacity(capacity, fixed_point)
    half_range = fixed_point.max_magnitude + 1
    per_contribution = fixed_point.max_magnitude // capacity
    exact = Fraction(bound)

    def fits(f: int) -> bool:
        scaled = exact * 2**f
        return capacity * scaled < half_range and round(scaled) <= per_contribution

    guess = math.log2(half_range) - math.log2(capacity) - math.log2(bound)
    f = min(MAX_FRAC_BITS, max(0, math.floor(guess) + 2))
    while f >= 0 and not fits(f):
        f -= 1
    if f < 0:
        raise ConfigError(
            f"bound {bound:g} is too large for capacity {capacity} and total_bits "
            f"{total_bits}: K·bound must be < 2^(b−1) = {half_range}"
        )
    return f


def _check_capacity(capacity: int, fixed_point: FixedPoint) -> None:
    """Each of K contributions needs an integer bound (2^(b−1) − 1) // K ≥ 1."""
    if capacity > fixed_point.max_magnitude:
        raise ConfigError(
            f"capacity must be ≤ 2^(b−1) − 1 = {fixed_point.max_magnitude} for total_bits "
            f"{fixed_point.total_bits} (each contribution needs an integer bound ≥ 1), "
            f"got {capacity}"
        )


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__
