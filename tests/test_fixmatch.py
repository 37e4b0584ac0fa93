"""FixMatch: the unlabeled loss uses only confident pseudo-labels, the strong augmentation
(RandAugment + Cutout), and the step in the training loop."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F
from fakes import two_class_halves
from torch import nn

from labeldp.augment import Normalize, WeakAugment
from labeldp.errors import ConfigError
from labeldp.strong_augment import OPERATIONS, StrongAugment, cutout
from labeldp.train import HardLabels, TrainConfig, Trainer
from labeldp.train.fixmatch import FixMatchStep, unlabeled_loss


def test_unlabeled_loss_uses_only_confident_pseudo_labels():
    weak = torch.tensor([[5.0, 0.0, 0.0], [0.2, 0.1, 0.0], [0.0, 0.0, 9.0], [1.0, 1.1, 0.9]])
    weak.requires_grad_(True)
    strong = torch.randn(4, 3, requires_grad=True)
    loss, mask = unlabeled_loss(weak, strong, threshold=0.95)
    assert mask.tolist() == [True, False, True, False]
    expected = (
        F.cross_entropy(strong[[0]], torch.tensor([0]))
        + F.cross_entropy(strong[[2]], torch.tensor([2]))
    ) / 4
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert weak.grad is None  # no gradient through the weak view (pseudo-labels are fixed)
    assert (strong.grad[[1, 3]] == 0).all() and (strong.grad[[0, 2]] != 0).any()


def test_strong_augment_is_uint8_seeded_and_varies_per_image():
    images = torch.randint(0, 256, (32, 3, 16, 16), dtype=torch.uint8)
    aug = StrongAugment()
    a = aug(images, torch.Generator().manual_seed(0))
    b = aug(images, torch.Generator().manual_seed(0))
    c = aug(images, torch.Generator().manual_seed(1))
    assert a.dtype == torch.uint8 and a.shape == images.shape
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(StrongAugment(num_ops=0, cutout_fraction=0)(images), images)


def test_cutout_greys_a_half_side_square_clipped_at_the_border():
    x = torch.ones(200, 1, 16, 16)
    out = cutout(x, 8, torch.Generator().manual_seed(0))
    grey = (out == 0.5).sum(dim=(1, 2, 3))
    assert grey.max() == 64 and grey.min() >= 16  # a corner centre keeps a quarter
    assert 0.2 < (grey == 64).float().mean() < 0.45  # centre in the middle 9 × 9: p ≈ 0.32


def test_operations_at_neutral_magnitude_and_known_values():
    x = torch.rand(4, 3, 16, 16)
    ops = dict(OPERATIONS)
    half = torch.full((4,), 0.5)
    for name in ("identity", "rotate", "shear_x", "shear_y", "translate_x", "translate_y"):
        torch.testing.assert_close(ops[name](x, half), x, atol=1e-5, rtol=0)
    m = torch.tensor([0.0, 0.5, 1.0, 0.25])
    factor = (0.05 + 0.9 * m).view(-1, 1, 1, 1)
    torch.testing.assert_close(ops["brightness"](x, m), (x * factor).clamp(0, 1))
    solar = ops["solarize"](x, m)
    torch.testing.assert_close(solar, torch.where(x >= m.view(-1, 1, 1, 1), 1 - x, x))
    assert len(OPERATIONS) == 14


def test_strong_augment_validates_its_options():
    with pytest.raises(ConfigError, match="num_ops"):
        StrongAugment(num_ops=-1)
    with pytest.raises(ConfigError, match="cutout_fraction"):
        StrongAugment(cutout_fraction=1.5)


def _step(unlabeled, seed=0):
    return FixMatchStep(
        unlabeled,
        Normalize((0.3,), (0.3,)),
        WeakAugment(crop_padding=1, hflip=False),
        StrongAugment(num_ops=1, cutout_fraction=0.25),
        mu=3,
        threshold=0.9,
        seed=seed,
    )


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 2))


def test_the_step_is_reproducible_from_its_seed():
    images, labels = two_class_halves()
    grads = []
    for _ in range(2):
        model = _model()
        step = _step(images, seed=5)
        step.start_epoch(3)
        x = Normalize((0.3,), (0.3,))(images[:8])
        step(model, x, torch.arange(8), HardLabels(labels), nullcontext)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


def test_fixmatch_learns_from_few_labels_and_many_unlabeled_images():
    images, labels = two_class_halves()
    test_images, test_labels = two_class_halves(seed=1)
    few = torch.arange(20)  # 20 labels, 400 unlabeled images
    step = _step(images)
    result = Trainer(
        _model(), images[few], HardLabels(labels[few]),
        TrainConfig(epochs=15, batch_size=10, lr=0.05, ema_decay=0.9),
        normalize=Normalize((0.3,), (0.3,)), augment=WeakAugment(crop_padding=1, hflip=False),
        test_images=test_images, test_labels=test_labels, step=step, progress=False,
    ).fit()  # fmt: skip
    assert result.test_accuracy > 0.9
    assert 0 < step.last_mask_rate <= 1


def test_fixmatch_step_validates_its_options():
    images, _ = two_class_halves(n=10)
    with pytest.raises(ConfigError, match="mu must be an integer ≥ 1"):
        FixMatchStep(images, Normalize((0.3,), (0.3,)), StrongAugment(), StrongAugment(), mu=0)
    with pytest.raises(ConfigError, match="threshold must be in"):
        FixMatchStep(images, Normalize((0.3,), (0.3,)), StrongAugment(), StrongAugment(), 7, 0)


def test_the_unlabeled_batch_follows_the_nominal_labeled_batch():
    """With fewer labels than the batch (a PATE student with few answers), the step still
    draws μ·B unlabeled images when told B; otherwise μ times the labeled batch."""
    images, labels = two_class_halves()
    seen = []

    class Counting(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = _model()

        def forward(self, x):
            seen.append(len(x))
            return self.inner(x)

    x = Normalize((0.3,), (0.3,))(images[:3])
    for labeled_batch, expected in ((None, 3 + 2 * 2 * 3), (16, 3 + 2 * 2 * 16)):
        step = FixMatchStep(
            images, Normalize((0.3,), (0.3,)), WeakAugment(0, False), WeakAugment(0, False),
            mu=2, labeled_batch=labeled_batch,
        )  # fmt: skip
        step(Counting(), x, torch.arange(3), HardLabels(labels), nullcontext)
        assert seen[-1] == expected
    with pytest.raises(ConfigError, match="labeled_batch must be an integer ≥ 1"):
        FixMatchStep(images, Normalize((0.3,), (0.3,)), WeakAugment(0, False),
                     WeakAugment(0, False), labeled_batch=0)  # fmt: skip
