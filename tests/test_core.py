"""The one training loop (issue 14 item 4): the loop body ``train_steps`` on stacked models
equals it on each model alone, bit for bit; the one optimizer configuration leaves the
stored identities of the configurations that derive it unchanged; the one checkpoint
helper refuses another configuration's file and anything but weights; ensemble
checkpoints of the layout before the helper still resume exactly."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from fakes import two_class_halves
from torch import nn

from labeldp.augment import Normalize, WeakAugment
from labeldp.errors import ConfigError
from labeldp.strong_augment import StrongAugment
from labeldp.train import HardLabels, TrainConfig
from labeldp.train.checkpoint import (
    CHECKPOINT_FORMAT,
    check_fingerprint,
    load_checkpoint,
    save_checkpoint,
)
from labeldp.train.config import SGDConfig
from labeldp.train.core import Optimization, train_steps
from labeldp.train.ema import StackedWeightAverage
from labeldp.train.ensemble import (
    EnsembleFixMatchConfig,
    EnsembleFixMatchStep,
    PartBatches,
    StackedModels,
    fixmatch_views,
    train_fixmatch_ensemble,
)

NORM = Normalize((0.3,), (0.3,))


def _models(n, seed=0):
    # 32 outputs: every parameter's size is a multiple of the widest CPU vector loop, so
    # the elementwise optimizer and average run the same kernels stacked and alone.
    out = []
    for i in range(n):
        torch.manual_seed(seed + i)
        out.append(nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32)))
    return out


def test_stacked_models_through_the_loop_body_equal_each_model_alone():
    """n FixMatch teachers trained together by ``train_steps`` end exactly where each
    would end trained alone by it on the same batches (what the ensemble and the
    federated clients rely on: stacking changes nothing per model)."""
    images, labels = two_class_halves(n=120)
    parts = [torch.arange(i * 10, i * 10 + 10) for i in range(3)]
    config = EnsembleFixMatchConfig(steps=6, batch_size=4, mu=2, threshold=0.6, lr=0.05,
                                    ema_decay=0.9)  # fmt: skip
    views = fixmatch_views(NORM, WeakAugment(1, False), StrongAugment(1, cutout_fraction=0.25))
    step = EnsembleFixMatchStep(config.threshold, config.lambda_u)
    seen = []

    def recorded(data, indices, generator):
        seen.append((indices, views(data, indices, generator)))
        return seen[-1][1]

    stacked = StackedModels(_models(3), forward="loop")
    average = StackedWeightAverage(stacked.params, config.ema_decay)
    optimization = Optimization(config.sgd, list(stacked.params.values()), 6, average)
    sampler = PartBatches(parts, 4, images.device, unlabeled=8)
    lr = train_steps(
        stacked, images, HardLabels(labels), range(6), step, sampler,
        torch.Generator().manual_seed(0), optimization=optimization, inputs=recorded,
    )  # fmt: skip
    assert lr == config.sgd.learning_rate(5, 6) and len(seen) == 6

    for i in range(3):

        class Replay:
            def batches(self, num_examples, generator, i=i):
                for (labeled, unlabeled), _ in seen:
                    yield labeled[i : i + 1], unlabeled[i : i + 1]

        replayed = iter(seen)
        alone = StackedModels(_models(3)[i : i + 1], forward="loop")
        own = Optimization(
            config.sgd, list(alone.params.values()), 6,
            StackedWeightAverage(alone.params, config.ema_decay),
        )  # fmt: skip
        train_steps(
            alone, images, HardLabels(labels), range(6), step, Replay(), torch.Generator(),
            optimization=own, inputs=lambda data, idx, g, i=i, r=replayed: next(r)[1][i : i + 1],
        )  # fmt: skip
        for name, value in stacked.params.items():
            assert torch.equal(alone.params[name][0], value[i]), (i, name)
            assert torch.equal(own.ema.average[name][0], average.average[name][i]), (i, name)
    assert not torch.equal(stacked.params["1.weight"][0], _models(1)[0][1].weight)  # it trained


def test_the_one_optimizer_config_leaves_the_stored_identities_unchanged():
    # Derived, never stored: the ensemble's repr (its checkpoint's identity) and asdict
    # (the shared votes folder's key) and TrainConfig's fields (run fingerprints) are
    # exactly those of the code before SGDConfig.
    teachers = EnsembleFixMatchConfig(steps=5)
    assert dataclasses.asdict(teachers) == {
        "steps": 5, "batch_size": 16, "mu": 7, "threshold": 0.95, "lambda_u": 1.0,
        "lr": 0.03, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4,
        "schedule": "fixmatch", "ema_decay": 0.999, "seed": 0, "checkpoint_every": 200,
    }  # fmt: skip
    assert repr(teachers).startswith("EnsembleFixMatchConfig(steps=5, batch_size=16, mu=7,")
    assert teachers.sgd == SGDConfig(0.03, 0.9, True, 5e-4, "fixmatch", 0.0)
    assert list(TrainConfig(epochs=1).to_dict()) == [
        "epochs", "batch_size", "lr", "momentum", "nesterov", "weight_decay", "schedule",
        "warmup_fraction", "ema_decay", "seed", "eval_every", "eval_batch_size", "precision",
        "mixup_alpha",
    ]  # fmt: skip
    assert TrainConfig(epochs=1, lr=0.2).sgd == SGDConfig(0.2, 0.9, True, 5e-4, "onecycle", 0.2)
    with pytest.raises(ConfigError, match="nesterov needs momentum > 0"):
        EnsembleFixMatchConfig(steps=5, momentum=0.0)


class _Opaque:
    """An object a checkpoint must not hold (unpickling it could run code)."""


def test_the_checkpoint_helper_refuses_another_run_and_anything_but_weights(tmp_path):
    path = tmp_path / "state.ckpt"
    state = {"format": CHECKPOINT_FORMAT, "fingerprint": {"run": 1}, "w": torch.arange(3)}
    save_checkpoint(path, state)
    assert [p.name for p in tmp_path.iterdir()] == ["state.ckpt"]  # no temporary left
    loaded = load_checkpoint(path, fingerprint={"run": 1}, device="cpu", mismatch="no")
    assert torch.equal(loaded["w"], state["w"])
    with pytest.raises(ConfigError, match="another run"):
        load_checkpoint(path, fingerprint={"run": 2}, device="cpu", mismatch="another run")
    with pytest.raises(ConfigError, match="x"):
        check_fingerprint({"w": 1}, {"run": 1}, "x")  # no fingerprint at all
    upgraded = load_checkpoint(
        path, fingerprint={"run": 3}, device="cpu", mismatch="no",
        upgrade=lambda s: {**s, "fingerprint": {"run": 3}},
    )  # fmt: skip
    assert upgraded["fingerprint"] == {"run": 3}
    save_checkpoint(path, {"fingerprint": {"run": 1}, "code": _Opaque()})  # not weights
    with pytest.raises(Exception, match="Weights only load failed"):
        load_checkpoint(path, fingerprint={"run": 1}, device="cpu", mismatch="no")


class _Interrupt(Exception):
    pass


class _Dying(WeakAugment):
    """A weak augmentation that raises on call number ``at``."""

    def __init__(self, at):
        super().__init__(crop_padding=1, hflip=False)
        self.at, self.calls = at, 0

    def __call__(self, images, generator):
        self.calls += 1
        if self.calls == self.at:
            raise _Interrupt
        return super().__call__(images, generator)


def _teachers(path, seed=0, weak=None):
    images, labels = two_class_halves(n=100)
    config = EnsembleFixMatchConfig(steps=10, batch_size=4, mu=2, threshold=0.9, lr=0.05,
                                    ema_decay=0.9, checkpoint_every=4)  # fmt: skip
    stacked = StackedModels(_models(2, seed))
    return train_fixmatch_ensemble(
        stacked, images, labels, [torch.arange(0, 10), torch.arange(10, 20)], config,
        normalize=NORM, weak=weak or WeakAugment(crop_padding=1, hflip=False),
        strong=StrongAugment(num_ops=1, cutout_fraction=0.25), checkpoint_path=path,
        progress=False,
    )  # fmt: skip


def test_an_ensemble_checkpoint_of_the_layout_before_the_helper_resumes_exactly(tmp_path):
    straight = _teachers(None)
    path = tmp_path / "teachers.ckpt"
    with pytest.raises(_Interrupt):
        _teachers(path, weak=_Dying(at=2 * 5 + 1))  # two weak views a step: dies in step 6
    state = torch.load(path, weights_only=True)
    assert state["format"] == CHECKPOINT_FORMAT and state["step"] == 4
    fingerprint = state.pop("fingerprint")
    del state["format"]
    # the checkpoint as the code before the helper wrote it
    legacy = {"config": fingerprint["config"], "teachers": fingerprint["teachers"], **state}
    torch.save(legacy, path)
    resumed = _teachers(path, seed=50)
    for key in straight:
        assert torch.equal(resumed[key], straight[key]), key
    assert torch.load(path, weights_only=True)["fingerprint"] == fingerprint  # rewritten
    legacy["teachers"] = 3
    torch.save(legacy, path)
    with pytest.raises(ConfigError, match="another ensemble configuration"):
        _teachers(path)


def test_part_batches_draw_each_models_batch_from_its_own_part():
    parts = [torch.arange(0, 5), torch.arange(5, 7), torch.tensor([9])]
    batches = PartBatches(parts, 4, torch.device("cpu")).batches(10, torch.Generator())
    for _ in range(20):
        labeled = next(batches)
        assert labeled.shape == (3, 4)
        for i, part in enumerate(parts):
            assert torch.isin(labeled[i], part).all()
    labeled, unlabeled = next(PartBatches(parts, 2, "cpu", 3).batches(10, torch.Generator()))
    assert labeled.shape == (3, 2) and unlabeled.shape == (3, 3) and unlabeled.max() < 10
    with pytest.raises(ConfigError, match="at least one labeled example"):
        PartBatches([torch.arange(3), torch.arange(0)], 2, torch.device("cpu"))
