"""Where mechanisms get their randomness: a seeded torch generator, or the OS.

Reproducible experiments pass a ``torch.Generator``. ``secure=True`` instead reads every
random bit from the operating system's entropy source (``os.urandom``), so no seed exists
that an adversary could guess or find in a config file.

What secure mode guarantees: the noise is unpredictable, and the uniform variates are
exact dyadic numbers (k + 1/2)·2⁻⁵², strictly inside (0, 1). What it does not: Laplace
and Gaussian noise are still made from those uniforms with floating-point arithmetic
(inverse CDF, Box–Muller), and the pattern of low-order bits of such floats can leak the
value that was noised (Mironov 2012, "On significance of the least significant bits for
differential privacy"). Randomized response only compares uniforms with probabilities and
is unaffected. A deployment that releases raw noisy values (rather than a model trained
on them) should snap or discretize them first.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from ..errors import ConfigError

_TWO_TO_MINUS_52 = 2.0**-52
_TWO_TO_MINUS_53 = 2.0**-53


def check_source(generator: torch.Generator | None, secure: bool) -> None:
    """Refuses a generator together with secure mode (the generator would be ignored)."""
    if secure and generator is not None:
        raise ConfigError(
            "generator must be None when secure=True: secure noise comes from the OS, not a seed"
        )


def uniform(
    shape: tuple[int, ...],
    *,
    generator: torch.Generator | None = None,
    secure: bool = False,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Uniform variates in the open interval (0, 1), float64, on ``device``.

    Secure: (k + 1/2)·2⁻⁵² for k uniform on 52-bit integers read from os.urandom; every
    such value is exactly representable in float64, so none rounds to 0 or 1.
    Seeded: torch.rand in float64 from ``generator`` (on the generator's device), moved to
    ``device``; an exact 0 (probability 2⁻⁵³) is replaced by 2⁻⁵⁴.
    """
    count = int(np.prod(shape)) if shape else 1
    if secure:
        bits = np.frombuffer(os.urandom(8 * count), dtype=np.uint64) >> np.uint64(12)
        values = (bits.astype(np.float64) + 0.5) * _TWO_TO_MINUS_52
        return torch.from_numpy(values).reshape(shape).to(device)
    gen_device = generator.device if generator is not None else torch.device(device)
    values = torch.rand(shape, generator=generator, dtype=torch.float64, device=gen_device)
    return values.clamp_min_(_TWO_TO_MINUS_53 / 2).to(device)


def standard_normal(
    shape: tuple[int, ...],
    *,
    generator: torch.Generator | None = None,
    secure: bool = False,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """N(0, 1) variates, float64. Secure mode uses Box–Muller on secure uniforms."""
    if not secure:
        gen_device = generator.device if generator is not None else torch.device(device)
        return torch.randn(shape, generator=generator, dtype=torch.float64, device=gen_device).to(
            device
        )
    u1 = uniform(shape, secure=True, device=device)
    u2 = uniform(shape, secure=True, device=device)
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * torch.pi * u2)


def standard_laplace(
    shape: tuple[int, ...],
    *,
    generator: torch.Generator | None = None,
    secure: bool = False,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Laplace(0, 1) variates (density e^{−|x|}/2), float64, by the inverse CDF."""
    v = uniform(shape, generator=generator, secure=secure, device=device) - 0.5
    return -torch.sign(v) * torch.log1p(-2.0 * v.abs())
