"""Batched augmentation against per-example brute force."""

import pytest
import torch
import torch.nn.functional as F

from labeldp.augment import Normalize, WeakAugment, random_crop, random_hflip
from labeldp.errors import ConfigError


def _images(n=16, c=3, h=9, w=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, h, w), generator=g, dtype=torch.uint8)


def test_normalize_matches_formula():
    images = _images(c=2)
    norm = Normalize(mean=(0.25, 0.5), std=(0.5, 0.125))
    expected = (images.float() / 255 - torch.tensor([0.25, 0.5]).view(1, 2, 1, 1)) / torch.tensor(
        [0.5, 0.125]
    ).view(1, 2, 1, 1)
    torch.testing.assert_close(norm(images), expected, rtol=1e-5, atol=1e-5)


def test_normalize_rejects_bad_std():
    with pytest.raises(ConfigError, match="std"):
        Normalize(mean=(0.5,), std=(0.0,))
    with pytest.raises(ConfigError, match="one value per channel"):
        Normalize(mean=(0.5, 0.5), std=(1.0,))


@pytest.mark.parametrize("padding", [1, 2, 4])
def test_random_crop_equals_a_reflect_padded_window(padding):
    images = _images(h=9, w=8)
    out = random_crop(images, padding, torch.Generator().manual_seed(1))
    assert out.shape == images.shape and out.dtype == torch.uint8
    padded = F.pad(images.float(), (padding,) * 4, mode="reflect")
    side = 2 * padding + 1
    for i in range(images.shape[0]):
        windows = [
            padded[i, :, dy : dy + 9, dx : dx + 8] for dy in range(side) for dx in range(side)
        ]
        assert any(torch.equal(out[i].float(), wnd) for wnd in windows), f"example {i}"


def test_random_crop_offsets_cover_all_choices():
    # With padding 1 on distinct-valued images, the centre pixel reveals the offset.
    images = torch.arange(25, dtype=torch.uint8).view(1, 1, 5, 5).repeat(2000, 1, 1, 1)
    out = random_crop(images, 1, torch.Generator().manual_seed(0))
    centres, counts = out[:, 0, 2, 2].unique(return_counts=True)
    assert len(centres) == 9  # all (2·1+1)² translations occur
    assert counts.min() > 2000 / 9 * 0.7  # roughly uniform


def test_random_crop_is_reproducible_and_seed_dependent():
    images = _images()
    a = random_crop(images, 2, torch.Generator().manual_seed(5))
    b = random_crop(images, 2, torch.Generator().manual_seed(5))
    c = random_crop(images, 2, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_random_hflip_flips_about_half_and_only_flips():
    images = _images(n=4000, h=3, w=4)
    out = random_hflip(images, torch.Generator().manual_seed(0))
    same = (out == images).flatten(1).all(1)
    flipped = (out == images.flip(-1)).flatten(1).all(1)
    assert bool((same | flipped).all())
    share = flipped.float().mean().item()
    assert 0.46 < share < 0.54  # binomial(4000, 1/2): 5 standard deviations ≈ ±0.04


def test_weak_augment_validates_and_skips_flip():
    with pytest.raises(ConfigError, match="crop_padding"):
        WeakAugment(crop_padding=-1)
    images = _images()
    out = WeakAugment(crop_padding=0, hflip=False)(images, torch.Generator())
    assert torch.equal(out, images)
