"""Stacked teachers: every forward strategy (vmap, grouped, loop) and the per-teacher
gradients equal each model alone; FixMatch on the ensemble learns and resumes; votes are
histograms."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from fakes import two_class_halves
from torch import nn

from labeldp.augment import Normalize, WeakAugment
from labeldp.errors import ConfigError
from labeldp.models import build_model
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


@pytest.mark.parametrize("forward", ["vmap", "grouped", "loop", "auto"])
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


@pytest.mark.parametrize("name", ["cnn", "cnn-tanh"])
def test_grouped_forward_of_the_zoo_models_equals_each_model_alone_in_float64(name):
    torch.manual_seed(1)
    models = [
        build_model(name, num_classes=10, in_channels=1, image_size=28, norm="group").double()
        for _ in range(3)
    ]
    stacked = StackedModels(models, forward="grouped")
    x = torch.randn(3, 4, 1, 28, 28, dtype=torch.float64)
    y = torch.randint(0, 10, (3, 4))
    logits = stacked(x)
    F.cross_entropy(logits.reshape(12, -1), y.reshape(-1), reduction="sum").backward()
    for i, model in enumerate(models):
        torch.testing.assert_close(logits[i], model(x[i]), rtol=1e-12, atol=1e-12)
        F.cross_entropy(model(x[i]), y[i], reduction="sum").backward()
        for p_name, p in model.named_parameters():
            torch.testing.assert_close(
                stacked.params[p_name].grad[i], p.grad, rtol=1e-10, atol=1e-12
            )


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, x):
        return x + self.conv(x)


@pytest.mark.parametrize(
    "model, reason",
    [
        (_Residual(), "calls <built-in function add> outside a layer"),
        (nn.Sequential(nn.Conv2d(1, 2, 3), nn.Dropout(0.5)), "layer 1 is a Dropout"),
        (nn.Sequential(nn.Conv2d(1, 2, 3, padding_mode="reflect")), "pads with 'reflect'"),
    ],
)
def test_grouped_forward_refuses_what_it_cannot_run_and_auto_falls_back(model, reason):
    with pytest.raises(ConfigError, match=f"forward='grouped' cannot run .*{re.escape(reason)}"):
        StackedModels([model], forward="grouped")
    stacked = StackedModels([model], forward="auto")  # no cpu_stack_forward: the loop
    assert stacked(torch.randn(1, 2, 1, 8, 8)).shape[:2] == (1, 2)


def test_an_unknown_forward_strategy_is_refused():
    with pytest.raises(ConfigError, match="forward must be one of auto, vmap, grouped, loop"):
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
