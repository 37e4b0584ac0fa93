"""Training recipes: each method's default training per dataset, in one declared place.

A :class:`Recipe` says how a method trains on a dataset by default: TrainConfig fields
(epochs, learning rate, schedule, warm-up, weight decay, mixup, ...), RunConfig fields
(model, normalization, augmentation) and method options (e.g. how RR's labels are learnt
from). ``labeldp train`` fills every option not given on its command line from the
recipe, sweep files start from it (their ``[train]`` and per-method tables replace what
they set; ``recipes = false`` turns recipes off), and ``labeldp recipes`` prints them.
What a run used is always recorded in full in its config.json.

Recipes are chosen on a validation split carved from the training set, never on the test
set: experiments/fashion_mnist_tuning.toml is the committed tuning sweep and
results/fashion_mnist_tuning.md its table; each recipe's ``tuned`` text says what was
tried and what won. A method without a recipe for a dataset trains with the TrainConfig
defaults.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any

from .errors import ConfigError

#: The RunConfig fields a recipe may set (the rest describe the experiment, not training).
RUN_FIELDS = ("model", "norm", "crop_padding", "hflip")


@dataclass(frozen=True)
class Recipe:
    """A method's default training on one dataset.

    train: TrainConfig fields (never ``seed``). run: RunConfig fields among
    :data:`RUN_FIELDS`. options: method options (never ``epsilon``). tuned: what was tried
    on the validation split and what won (the evidence is the tuning sweep's table).
    """

    train: Mapping[str, Any] = field(default_factory=dict)
    run: Mapping[str, Any] = field(default_factory=dict)
    options: Mapping[str, Any] = field(default_factory=dict)
    tuned: str = ""

    def __post_init__(self) -> None:
        from .train import TrainConfig  # noqa: PLC0415 (keeps this module light to import)

        train_fields = {f.name for f in fields(TrainConfig)} - {"seed"}
        bad = sorted(set(self.train) - train_fields)
        if bad:
            raise ConfigError(f"recipe train fields must be among {sorted(train_fields)}: {bad}")
        bad = sorted(set(self.run) - set(RUN_FIELDS))
        if bad:
            raise ConfigError(f"recipe run fields must be among {list(RUN_FIELDS)}: {bad}")
        if "epsilon" in self.options:
            raise ConfigError("a recipe cannot set epsilon")
        for name in ("train", "run", "options"):
            object.__setattr__(self, name, MappingProxyType(dict(getattr(self, name))))

    def to_dict(self) -> dict[str, Any]:
        return {
            "train": dict(self.train),
            "run": dict(self.run),
            "options": dict(self.options),
            "tuned": self.tuned,
        }


_FMNIST_TUNED = (
    "Tuning sweep round 1 (experiments/fashion_mnist_tuning.toml, validation split of 10,000 "
    "training examples, 6 epochs, seed 0): RR at ε = 0.5 and 1 over peak lr {0.02, 0.05} × "
    "learning {plain, forward, posterior} × mixup α {0, 4}."
)

#: dataset → method → Recipe. Methods absent here train with the TrainConfig defaults.
RECIPES: dict[str, dict[str, Recipe]] = {
    "fashion-mnist": {},
}


def recipe(method: str, dataset: str) -> Recipe:
    """The recipe of ``method`` on ``dataset``; an empty one (the TrainConfig defaults)
    when none is declared."""
    return RECIPES.get(dataset, {}).get(method, Recipe())


__all__ = ["RECIPES", "RUN_FIELDS", "Recipe", "recipe"]
