"""FixMatch's strong augmentation, batched on the device: RandAugment + Cutout.

Spec: shared/specs/pate_fixmatch.md (FixMatch). Every image gets its own two operations,
drawn uniformly (with replacement) from the 14 of FixMatch's RandAugment, each at its own
magnitude drawn uniformly from the operation's range, then one Cutout square of half the
image side at a uniform random centre (clipped at the border), filled with mid-grey.
The batch is processed operation by operation — the images that drew operation k are
transformed together with kornia — so nothing loops over images in Python.

Input and output are uint8 (N, C, H, W), like :class:`labeldp.augment.WeakAugment`; the
operations work on floats in [0, 1] in between. Ranges (FixMatch, Sohn et al. 2020,
appendix): brightness, color, contrast, sharpness factors in [0.05, 0.95]; posterize to
4–8 bits; rotate ±30°; shear ±0.3; solarize threshold in [0, 1]; translate ±30 % of the
side; autocontrast, equalize and identity take no magnitude.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import kornia.enhance as enhance
import kornia.geometry.transform as geometry
import torch

from .errors import ConfigError


def _gray(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        return x
    weights = torch.tensor([0.299, 0.587, 0.114], device=x.device, dtype=x.dtype)
    return (x * weights.view(1, 3, 1, 1)).sum(1, keepdim=True)


def _blend(degenerate: torch.Tensor, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL ImageEnhance semantics: degenerate + factor · (x − degenerate), clipped."""
    return (degenerate + factor.view(-1, 1, 1, 1) * (x - degenerate)).clamp(0, 1)


def _factor(m: torch.Tensor) -> torch.Tensor:
    return 0.05 + 0.9 * m


def _identity(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return x


def _autocontrast(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    lo = x.amin(dim=(2, 3), keepdim=True)
    hi = x.amax(dim=(2, 3), keepdim=True)
    span = hi - lo
    return torch.where(span > 0, (x - lo) / span.clamp_min(1e-12), x)


def _brightness(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return _blend(torch.zeros_like(x), x, _factor(m))


def _color(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return _blend(_gray(x).expand_as(x), x, _factor(m))


def _contrast(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
    return _blend(mean.expand_as(x), x, _factor(m))


def _equalize(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return enhance.equalize(x)


def _posterize(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    bits = (4 + torch.round(4 * m)).to(torch.int64)
    return enhance.posterize(x, bits)


def _rotate(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return geometry.rotate(x, (2 * m - 1) * 30.0)


def _sharpness(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return enhance.sharpness(x, _factor(m)).clamp(0, 1)


def _shear(axis: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    def op(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        amount = torch.zeros(len(m), 2, device=x.device, dtype=x.dtype)
        amount[:, axis] = (2 * m - 1) * 0.3
        return geometry.shear(x, amount)

    return op


def _solarize(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= m.view(-1, 1, 1, 1), 1.0 - x, x)


def _translate(axis: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    def op(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        shift = torch.zeros(len(m), 2, device=x.device, dtype=x.dtype)
        side = x.shape[3] if axis == 0 else x.shape[2]
        shift[:, axis] = (2 * m - 1) * 0.3 * side
        return geometry.translate(x, shift)

    return op


#: FixMatch's RandAugment pool: (name, op(x in [0,1] (n, C, H, W), magnitude (n,) in [0,1])).
OPERATIONS: tuple[tuple[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]], ...] = (
    ("identity", _identity),
    ("autocontrast", _autocontrast),
    ("brightness", _brightness),
    ("color", _color),
    ("contrast", _contrast),
    ("equalize", _equalize),
    ("posterize", _posterize),
    ("rotate", _rotate),
    ("sharpness", _sharpness),
    ("shear_x", _shear(0)),
    ("shear_y", _shear(1)),
    ("solarize", _solarize),
    ("translate_x", _translate(0)),
    ("translate_y", _translate(1)),
)


def cutout(
    x: torch.Tensor, size: int, generator: torch.Generator | None = None, fill: float = 0.5
) -> torch.Tensor:
    """Sets a ``size``×``size`` square (clipped at the border) at a uniform random centre
    of each image to ``fill``. ``x``: float (N, C, H, W)."""
    n, _, h, w = x.shape
    gen_device = generator.device if generator is not None else x.device
    cy = torch.randint(0, h, (n,), generator=generator, device=gen_device).to(x.device)
    cx = torch.randint(0, w, (n,), generator=generator, device=gen_device).to(x.device)
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    y0, x0 = (cy - size // 2).view(-1, 1, 1), (cx - size // 2).view(-1, 1, 1)
    inside = (rows >= y0) & (rows < y0 + size) & (cols >= x0) & (cols < x0 + size)
    return torch.where(inside.unsqueeze(1), torch.full_like(x, fill), x)


@dataclass(frozen=True)
class StrongAugment:
    """RandAugment (``num_ops`` operations per image, random magnitudes) then Cutout of
    ``cutout_fraction`` × the image side. uint8 (N, C, H, W) in and out.

    num_ops: ≥ 0 operations per image. cutout_fraction: side of the square / image side,
    in [0, 1] (0: no Cutout).
    """

    num_ops: int = 2
    cutout_fraction: float = 0.5

    def __post_init__(self) -> None:
        if isinstance(self.num_ops, bool) or not isinstance(self.num_ops, int) or self.num_ops < 0:
            raise ConfigError(f"num_ops must be an integer ≥ 0, got {self.num_ops!r}")
        if not 0 <= self.cutout_fraction <= 1:
            raise ConfigError(f"cutout_fraction must be in [0, 1], got {self.cutout_fraction}")

    def __call__(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ConfigError(f"images must be uint8 (N, C, H, W), got {images.dtype}")
        x = images.float() / 255.0
        n = x.shape[0]
        gen_device = generator.device if generator is not None else x.device
        for _ in range(self.num_ops):
            choice = torch.randint(
                0, len(OPERATIONS), (n,), generator=generator, device=gen_device
            ).to(x.device)
            magnitude = torch.rand(n, generator=generator, device=gen_device).to(x.device)
            out = x.clone()
            for k, (_, op) in enumerate(OPERATIONS):
                rows = torch.nonzero(choice == k).flatten()
                if len(rows):
                    out[rows] = op(x[rows], magnitude[rows]).clamp(0, 1)
            x = out
        size = round(self.cutout_fraction * min(x.shape[2], x.shape[3]))
        if size > 0:
            x = cutout(x, size, generator)
        return (x * 255.0).round().clamp(0, 255).to(torch.uint8)
