"""Batched, on-device image preprocessing: normalization and weak augmentation.

Everything here takes a whole batch of uint8 images ``(N, C, H, W)`` on the training
device and returns float32 ``(N, C, H, W)``; nothing loops over examples in Python.
Randomness comes from an explicit ``torch.Generator`` so a run is reproducible and can be
resumed mid-way (the training core seeds one per epoch).

Random crop and horizontal flip are written with plain tensor indexing: on these small
images that is faster than a general affine warp, on CPU and GPU alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .errors import ConfigError


@dataclass(frozen=True)
class Normalize:
    """Maps uint8 pixels to ``(x / 255 - mean) / std`` per channel.

    ``mean`` and ``std`` are per-channel values in [0, 1] pixel units (std > 0).
    """

    mean: Sequence[float]
    std: Sequence[float]

    def __post_init__(self) -> None:
        if len(self.mean) != len(self.std):
            raise ConfigError(
                f"mean and std must have one value per channel, got {len(self.mean)} "
                f"and {len(self.std)}"
            )
        if any(s <= 0 for s in self.std):
            raise ConfigError(f"std must be > 0 for every channel, got {tuple(self.std)}")

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """``images``: uint8 (N, C, H, W) -> float32 (N, C, H, W), normalized."""
        mean = torch.tensor(self.mean, dtype=torch.float32, device=images.device)
        std = torch.tensor(self.std, dtype=torch.float32, device=images.device)
        scale = (1.0 / (255.0 * std)).view(1, -1, 1, 1)
        shift = (mean / std).view(1, -1, 1, 1)
        return images.float() * scale - shift


def random_crop(
    images: torch.Tensor, padding: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Random translation by up to ``padding`` pixels each way, with reflect padding.

    ``images``: (N, C, H, W) of any dtype; ``padding``: pixels, 0 ≤ padding < min(H, W).
    Each example gets its own offset, drawn uniformly from the (2·padding + 1)² choices.
    """
    if padding == 0:
        return images
    n, _, h, w = images.shape
    if not 0 < padding < min(h, w):
        raise ConfigError(f"crop padding must be in [0, {min(h, w) - 1}], got {padding}")
    padded = torch.nn.functional.pad(
        images.float() if not images.is_floating_point() else images,
        (padding, padding, padding, padding),
        mode="reflect",
    ).to(images.dtype)
    gen_device = generator.device if generator is not None else images.device
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=gen_device)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=gen_device)
    dy, dx = dy.to(images.device), dx.to(images.device)
    rows = (dy[:, None] + torch.arange(h, device=images.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=images.device))[:, None, None, :]
    batch = torch.arange(n, device=images.device)[:, None, None, None]
    channels = torch.arange(images.shape[1], device=images.device)[None, :, None, None]
    return padded[batch, channels, rows, cols]


def random_hflip(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Flips each image left-right with probability 1/2. ``images``: (N, C, H, W)."""
    gen_device = generator.device if generator is not None else images.device
    flip = torch.rand(images.shape[0], generator=generator, device=gen_device) < 0.5
    flip = flip.to(images.device).view(-1, 1, 1, 1)
    return torch.where(flip, images.flip(-1), images)


@dataclass(frozen=True)
class WeakAugment:
    """The standard weak augmentation: random crop (reflect padding) and, where the classes
    allow it, random horizontal flip. Works on uint8 batches before normalization.

    ``crop_padding``: pixels, ≥ 0 (0 disables the crop); ``hflip``: whether to flip.
    """

    crop_padding: int = 2
    hflip: bool = True

    def __post_init__(self) -> None:
        if self.crop_padding < 0:
            raise ConfigError(f"crop_padding must be ≥ 0 pixels, got {self.crop_padding}")

    def __call__(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        out = random_crop(images, self.crop_padding, generator)
        if self.hflip:
            out = random_hflip(out, generator)
        return out
