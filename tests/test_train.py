"""The training core on small synthetic data: it learns, it resumes exactly, its pieces
match direct computations."""

import math

import pytest
import torch
import torch.nn.functional as F
from fakes import two_class_halves
from torch import nn

from labeldp.augment import Normalize, WeakAugment
from labeldp.errors import ConfigError
from labeldp.train import (
    HardLabels,
    ShuffledBatches,
    TrainConfig,
    Trainer,
    WeightAverage,
    learning_rate,
    target_loss,
)
from labeldp.train.steps import BackpropStep


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(256, 2)
    )


def _trainer(model, images, labels, config, **kw):
    return Trainer(
        model,
        images,
        kw.pop("targets", HardLabels(labels)),
        config,
        normalize=Normalize((0.3,), (0.3,)),
        augment=kw.pop("augment", WeakAugment(crop_padding=1, hflip=False)),
        test_images=images,
        test_labels=labels,
        progress=False,
        **kw,
    )


def test_learning_rate_schedules():
    total, peak = 100, 0.4
    onecycle = [learning_rate(s, total, peak, "onecycle", 0.2) for s in range(total)]
    assert onecycle[19] == pytest.approx(peak) and onecycle[0] == pytest.approx(peak / 20)
    assert onecycle[20] == pytest.approx(peak) and onecycle[-1] == pytest.approx(peak / 80)
    assert all(a >= b for a, b in zip(onecycle[20:], onecycle[21:], strict=False))
    cosine = [learning_rate(s, total, peak, "cosine", 0.0) for s in range(total)]
    assert cosine[0] == pytest.approx(peak)
    assert cosine[50] == pytest.approx(peak * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert learning_rate(7, total, peak, "constant", 0.5) == peak


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("epochs", 0, "epochs must be an integer ≥ 1"),
        ("batch_size", -3, "batch_size"),
        ("lr", 0.0, "lr must be"),
        ("lr", float("nan"), "lr must be"),
        ("momentum", 1.0, "momentum"),
        ("schedule", "linear", "schedule must be one of"),
        ("ema_decay", 1.0, "ema_decay"),
        ("precision", "fp16", "precision"),
        ("seed", -1, "seed"),
    ],
)
def test_train_config_rejects_bad_values(field, value, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig(**{"epochs": 1, field: value})


def test_soft_cross_entropy_equals_hard_for_one_hot_and_formula_otherwise():
    logits = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 3, 1, 0])
    one_hot = F.one_hot(labels, 4).float()
    torch.testing.assert_close(target_loss(logits, one_hot), F.cross_entropy(logits, labels))
    soft = torch.softmax(torch.randn(6, 4), dim=1)
    expected = -(soft * torch.log(torch.softmax(logits, 1))).sum(1)
    torch.testing.assert_close(target_loss(logits, soft, reduction="none"), expected)


def test_shuffled_batches_cover_each_example_once_in_near_equal_batches():
    sampler = ShuffledBatches(batch_size=32)
    batches = list(sampler.batches(1001, torch.Generator().manual_seed(0)))
    assert len(batches) == sampler.steps_per_epoch(1001) == 32
    sizes = {len(b) for b in batches}
    assert sizes <= {31, 32}
    assert torch.equal(torch.cat(batches).sort().values, torch.arange(1001))


def test_weight_average_matches_direct_recursion_with_warm_up():
    model = nn.Linear(3, 2)
    ema = WeightAverage(model, decay=0.9)
    expected = [p.detach().clone() for p in model.parameters()]
    # the warm-up's decays, written out: (1 + t) / (10 + t) = 0.1, 2/11, 0.25, ... until
    # it reaches 0.9 at t = 80; steps 79..81 straddle that point
    for step in [0, 1, 2, 79, 80, 81]:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update(model, step)
        d = 0.9 if step >= 80 else (1 + step) / (10 + step)
        expected = [
            d * e + (1 - d) * p.detach() for e, p in zip(expected, model.parameters(), strict=True)
        ]
    for e, p in zip(expected, ema.model.parameters(), strict=True):
        torch.testing.assert_close(p, e)


def test_trainer_learns_the_toy_task():
    images, labels = two_class_halves()
    result = _trainer(_model(), images, labels, TrainConfig(epochs=3, batch_size=32, lr=0.05)).fit()
    assert result.test_accuracy > 0.95
    assert [h.epoch for h in result.history] == [1, 2, 3]
    assert result.train_seconds > 0


def test_soft_targets_and_the_target_hook_see_the_current_model():
    images, labels = two_class_halves()
    normalize = Normalize((0.3,), (0.3,))
    holder = {}
    calls = []

    def soft_targets(indices, logits):
        assert not logits.requires_grad
        # The logits handed to the hook are the current model's own on this batch.
        with torch.no_grad():
            direct = holder["trainer"].model(normalize(images[indices]))
        torch.testing.assert_close(logits, direct, rtol=1e-4, atol=1e-5)
        calls.append(len(indices))
        return F.one_hot(labels[indices], 2).float() * 0.9 + 0.05

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 2))  # no batch statistics
    config = TrainConfig(epochs=2, batch_size=64, lr=0.05)
    trainer = _trainer(model, images, labels, config, targets=soft_targets, augment=None)
    holder["trainer"] = trainer
    result = trainer.fit()
    assert result.test_accuracy > 0.95
    assert calls == [64] * 16


def test_resume_after_interruption_reproduces_the_uninterrupted_run(tmp_path):
    images, labels = two_class_halves()
    config = TrainConfig(epochs=3, batch_size=32, lr=0.05, ema_decay=0.9, seed=3)
    straight = _trainer(_model(), images, labels, config).fit()

    class Interrupt(BackpropStep):
        calls = 0

        def __call__(self, *args, **kwargs):
            Interrupt.calls += 1
            if Interrupt.calls == 16 * 2 + 5:  # a few steps into the third epoch
                raise KeyboardInterrupt
            return super().__call__(*args, **kwargs)

    ckpt = tmp_path / "run.ckpt"
    first = _trainer(_model(), images, labels, config, step=Interrupt(), checkpoint_path=ckpt)
    with pytest.raises(KeyboardInterrupt):
        first.fit()
    assert ckpt.exists()
    second = _trainer(_model(seed=99), images, labels, config, checkpoint_path=ckpt)
    resumed = second.fit(resume=True)
    assert resumed.resumed_from_epoch == 2
    for a, b in zip(
        straight.eval_model.state_dict().values(),
        resumed.eval_model.state_dict().values(),
        strict=True,
    ):
        assert torch.equal(a, b)
    assert resumed.test_accuracy == straight.test_accuracy
    assert [h.train_loss for h in resumed.history] == [h.train_loss for h in straight.history]


def test_resume_refuses_a_checkpoint_of_another_configuration(tmp_path):
    images, labels = two_class_halves(n=64)
    ckpt = tmp_path / "run.ckpt"
    _trainer(
        _model(), images, labels, TrainConfig(epochs=1), checkpoint_path=ckpt, fingerprint={"a": 1}
    ).fit()
    other = _trainer(
        _model(), images, labels, TrainConfig(epochs=2), checkpoint_path=ckpt, fingerprint={"a": 2}
    )
    with pytest.raises(ConfigError, match="different configuration"):
        other.fit(resume=True)


def test_checkpoints_are_written_atomically(tmp_path, monkeypatch):
    images, labels = two_class_halves(n=64)
    ckpt = tmp_path / "run.ckpt"
    trainer = _trainer(_model(), images, labels, TrainConfig(epochs=1), checkpoint_path=ckpt)
    trainer.fit()
    good = ckpt.read_bytes()

    def broken_save(obj, handle):
        handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        trainer.save_checkpoint(ckpt)
    assert ckpt.read_bytes() == good
    assert list(tmp_path.iterdir()) == [ckpt]


def test_weight_average_of_a_short_run_is_not_its_initialization():
    # 300 steps of decay 0.999 without warm-up keep 0.999**300 = 0.74 of the initial
    # weights; with the warm-up the average of constant new weights is (almost) them.
    model = nn.Linear(3, 2)
    ema = WeightAverage(model, decay=0.999)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0)
    for step in range(300):
        ema.update(model, step)
    for p in ema.model.parameters():
        assert torch.all((p - 1.0).abs() < 1e-3)
