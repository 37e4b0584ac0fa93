"""Declared capabilities: every gradient step, target function and method is a subclass
of its base class (GradientStep, TargetFn, Method), and sets at class level only the
members its base declares. A misspelt capability (``private_output = True``) would
otherwise be silently ignored: the base's default would apply."""

from __future__ import annotations

import inspect
from typing import ClassVar

import pytest

import labeldp.methods
import labeldp.train
import labeldp.train.dpsgd
import labeldp.train.fixmatch
from labeldp.methods import METHODS
from labeldp.methods.base import Method
from labeldp.train.steps import GradientStep
from labeldp.train.targets import HardLabels, TargetFn

BASES = (GradientStep, TargetFn, Method)


def all_subclasses(base: type) -> list[type]:
    found, todo = [], list(base.__subclasses__())
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return [c for c in found if c.__module__.startswith("labeldp.")]


def undeclared_members(cls: type, base: type) -> list[str]:
    """Class-level data attributes of ``cls`` (and its bases up to ``base``) that
    ``base`` does not declare: names that are neither functions, properties nor
    descriptors and do not appear in ``base``'s namespace or annotations."""
    declared = set(vars(base)) | set(getattr(base, "__annotations__", {}))
    bad = []
    for klass in cls.__mro__[: cls.__mro__.index(base)]:
        for name, value in vars(klass).items():
            if name.startswith("_") or name in declared:
                continue
            if inspect.isroutine(value) or isinstance(value, (property, staticmethod, classmethod)):
                continue
            bad.append(f"{klass.__name__}.{name}")
    return bad


def test_the_registries_hold_every_library_class():
    steps = {c.__name__ for c in all_subclasses(GradientStep)}
    targets = {c.__name__ for c in all_subclasses(TargetFn)}
    assert {"BackpropStep", "DPSGDStep", "FixMatchStep"} <= steps
    assert {"HardLabels", "ForwardCorrectedLabels", "RRPosterior", "AlibiTargets",
            "CallableTargets"} <= targets  # fmt: skip
    assert all(issubclass(cls, Method) for cls in METHODS.values())
    assert set(all_subclasses(Method)) == set(METHODS.values())


@pytest.mark.parametrize("base", BASES, ids=lambda b: b.__name__)
def test_every_subclass_sets_only_declared_capabilities(base):
    for cls in all_subclasses(base):
        assert undeclared_members(cls, base) == [], cls


def test_the_check_finds_a_misspelt_capability():
    class Typo(GradientStep):
        private_output: ClassVar[bool] = True  # meant: private_outputs

    class Fine(GradientStep):
        private_outputs: ClassVar[bool] = True

    assert undeclared_members(Typo, GradientStep) == ["Typo.private_output"]
    assert undeclared_members(Fine, GradientStep) == []
    assert not Typo.private_outputs  # what the typo would have silently done


def test_declared_values():
    assert labeldp.train.dpsgd.DPSGDStep.private_outputs
    assert not labeldp.train.fixmatch.FixMatchStep.private_outputs
    assert labeldp.train.BackpropStep.supports_mixup
    assert not labeldp.train.dpsgd.DPSGDStep.supports_mixup
    assert not HardLabels.uses_logits
    assert labeldp.methods.rr.RRPosterior.uses_logits
    assert METHODS["dp-sgd"].epsilon_meaning and METHODS["pate-fm"].epsilon_meaning
    assert METHODS["rr"].epsilon_meaning is None


def test_the_trainer_refuses_a_step_of_another_kind_and_wraps_plain_targets():
    import torch
    from torch import nn

    from labeldp.augment import Normalize
    from labeldp.errors import ConfigError
    from labeldp.train import TrainConfig
    from labeldp.train.loop import Trainer
    from labeldp.train.targets import CallableTargets

    images = torch.zeros(8, 1, 4, 4, dtype=torch.uint8)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    config = TrainConfig(epochs=1, batch_size=4)
    normalize = Normalize([0.5], [0.5])
    labels = torch.zeros(8, dtype=torch.int64)
    with pytest.raises(ConfigError, match="step must be a GradientStep"):
        Trainer(model, images, HardLabels(labels), config, normalize=normalize,
                step=lambda *a: None)  # fmt: skip
    trainer = Trainer(model, images, lambda idx, logits: labels[idx], config, normalize=normalize)
    assert isinstance(trainer.targets, CallableTargets)
    with pytest.raises(ConfigError, match="targets must be a TargetFn"):
        Trainer(model, images, 3, config, normalize=normalize)
