"""Stacked teachers: the vmap'd forward and the per-teacher gradients equal each model
alone; FixMatch on the ensemble learns and resumes; votes are histograms."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from fakes import two_class_halves
from torch import nn

from labeldp.augment import Normalize, WeakAugment
from labeldp.errors import ConfigError
from labeldp.strong_augment import StrongAugment
from labeldp.train.ensemble import (
    EnsembleFixMatchConfig,
    StackedModels,
    ensemble_votes,
    train_fixmatch_ensemble,
)


def _models(n, seed=0):
    out = []
    for i in range(n):
        torch.manual_seed(seed + i)
        out.append(
            nn.Sequential(
                nn.Conv2d(1, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(),
                nn.Linear(256, 2),
            )
        )  # fmt: skip
    return out


@pytest.mark.parametrize("forward", ["vmap", "loop", "auto"])
def test_stacked_forward_and_gradients_equal_each_model_alone(forward):
    models = _models(3)
    stacked = StackedModels(models, forward=forward)
    x = torch.randn(3, 5, 1, 8, 8)
    y = torch.randint(0, 2, (3, 5))
    logits = stacked(x)
    loss = sum(F.cross_entropy(logits[i], y[i]) for i in range(3))
    loss.backward()
    for i, model in enumerate(models):
        torch.testing.assert_close(logits[i], model(x[i]))
        F.cross_entropy(model(x[i]), y[i]).backward()
        for name, p in model.named_parameters():
            torch.testing.assert_close(stacked.params[name].grad[i], p.grad)
    rebuilt = stacked.model(1)
    torch.testing.assert_close(rebuilt(x[1]), models[1](x[1]))


def test_an_unknown_forward_strategy_is_refused():
    with pytest.raises(ConfigError, match="forward must be auto, vmap or loop"):
        StackedModels(_models(1), forward="threads")


def test_batchnorm_is_refused():
    with pytest.raises(ConfigError, match="BatchNorm"):
        StackedModels([nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))])


def _train(stacked, images, labels, parts, steps, path=None, seed=0):
    config = EnsembleFixMatchConfig(
        steps=steps, batch_size=4, mu=2, threshold=0.9, lr=0.05, ema_decay=0.9,
        seed=seed, checkpoint_every=5,
    )  # fmt: skip
    return train_fixmatch_ensemble(
        stacked, images, labels, parts, config, normalize=Normalize((0.3,), (0.3,)),
        weak=WeakAugment(crop_padding=1, hflip=False),
        strong=StrongAugment(num_ops=1, cutout_fraction=0.25), checkpoint_path=path,
        progress=False,
    )  # fmt: skip


def test_ensemble_fixmatch_teachers_learn_and_vote():
    images, labels = two_class_halves(n=300)
    test_images, test_labels = two_class_halves(n=300, seed=1)
    parts = [torch.arange(i * 10, i * 10 + 10) for i in range(4)]  # 10 labels each
    stacked = StackedModels(_models(4))
    ema = _train(stacked, images, labels, parts, steps=60)
    votes = ensemble_votes(stacked, ema, test_images, Normalize((0.3,), (0.3,)), 2)
    assert votes.shape == (300, 2) and (votes.sum(1) == 4).all()
    for i in range(4):
        model = stacked.model(i, ema)
        accuracy = model(Normalize((0.3,), (0.3,))(test_images)).argmax(1) == test_labels
        assert accuracy.float().mean() > 0.85
    assert (votes.argmax(1) == test_labels).float().mean() > 0.9


def test_an_interrupted_ensemble_resumes_to_the_same_teachers(tmp_path, monkeypatch):
    images, labels = two_class_halves(n=100)
    parts = [torch.arange(0, 10), torch.arange(10, 20)]
    straight = _train(StackedModels(_models(2)), images, labels, parts, steps=12)
    path = tmp_path / "teachers.ckpt"
    calls = []
    original = Normalize.__call__

    def interrupting(self, x):
        calls.append(1)
        if len(calls) == 3 * 7 + 1:  # three views per step: dies during step 8
            raise KeyboardInterrupt
        return original(self, x)

    monkeypatch.setattr(Normalize, "__call__", interrupting)
    with pytest.raises(KeyboardInterrupt):
        _train(StackedModels(_models(2)), images, labels, parts, steps=12, path=path)
    monkeypatch.setattr(Normalize, "__call__", original)
    assert torch.load(path, weights_only=True)["step"] == 5
    resumed = _train(StackedModels(_models(2, seed=50)), images, labels, parts, 12, path)
    for k in straight:
        torch.testing.assert_close(resumed[k], straight[k], rtol=0, atol=0)
