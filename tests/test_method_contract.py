"""The contract every training method keeps, checked for each entry of ``METHODS`` (a new
method is checked as soon as it is registered, once it has tiny options below):

- ε in metrics.json is null iff the method is non-private (takes no ``epsilon``), and
  otherwise finite, > 0 and within the budget asked for; the ledger is empty iff null;
- its options round-trip: ``build_method(name, m.options())`` (through JSON, as
  config.json stores them) rebuilds a method with equal options, and every constructor
  parameter is recorded;
- the label noise is drawn once: every ``RunContext.privatized`` release is drawn once
  per run and stored, and a run interrupted in its last epoch and resumed draws none
  again and leaves the stored releases as they were;
- the resumed run ends with the same weights (bit for bit) as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch

from labeldp.errors import ConfigError
from labeldp.methods import METHODS, build_method, method_parameters
from labeldp.methods.base import RunContext
from labeldp.runner import Environment, RunConfig, train_run
from labeldp.train import TrainConfig, loop

pytestmark = pytest.mark.fake_fashion(n_train=100, n_test=40)

#: Per method: tiny options that train fast on 100 examples (and, under "run", the run
#: options it needs). Chosen away from the defaults where cheap, so that the round trip
#: shows options() records what was asked, not a default.
TINY: dict[str, dict] = {
    "none": {"options": {}},
    "rr": {"options": {"epsilon": 2.0, "learning": "forward"}},
    "lp-2st": {"options": {"epsilon": 2.0, "calibration_share": 0.1}},
    "lp-mst": {"options": {"epsilon": 3.0, "stages": 3, "learning": "posterior"}},
    "alibi": {"options": {"epsilon": 1.5, "prior": "uniform"}},
    "dp-sgd": {
        # a given noise multiplier keeps the accountant to one computation per run
        "options": {
            "epsilon": 50.0,
            "noise_multiplier": 2.0,
            "accountant": "rdp",
            "max_grad_norm": 0.5,
            "physical_batch_size": 7,
        },
        "run": {"norm": "group"},  # no batch statistics under per-example clipping
    },
    "labeldp-pro": {
        "options": {
            "epsilon": 50.0,
            "noise_multiplier": 2.0,
            "max_grad_norm": 0.5,
            "physical_batch_size": 7,
            "projection_batch": 4,
            "projection_steps": 5,
        },
        "run": {"norm": "group"},
    },
    "pate-fm": {
        "options": {
            "epsilon": 50.0,
            "teachers": 2,
            "queries": 30,
            "threshold": 1.0,
            "sigma1": 1.0,
            "sigma2": 1.0,
            "teacher_steps": 2,
            "teacher_batch": 4,
            "teacher_group": 2,
            "mu": 1,
            "fixmatch_threshold": 0.9,
            "ceiling_student": False,
        },
        "run": {"norm": "group"},  # the teachers are vmapped: no BatchNorm
    },
}

EPOCHS = 2


def tiny(name: str) -> dict:
    if name not in TINY:
        pytest.fail(
            f"method {name!r} is registered in METHODS but has no tiny options in "
            f"{__name__}.TINY: add an entry so that the method contract checks it"
        )
    return TINY[name]


def test_every_registered_method_has_tiny_options():
    assert set(TINY) == set(METHODS), "TINY must list exactly the methods in METHODS"


def is_private(name: str) -> bool:
    """A method is private iff it takes a privacy budget."""
    return "epsilon" in method_parameters(name)


#: Known breaks of the round trip (strict: the test fails once the method is fixed, so
#: that the entry is removed).
ROUND_TRIP_BROKEN: dict[str, str] = {}


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=ROUND_TRIP_BROKEN[n]))
        if n in ROUND_TRIP_BROKEN
        else n
        for n in sorted(METHODS)
    ],
)
def test_options_round_trip(name):
    method = build_method(name, tiny(name)["options"])
    options = method.options()
    assert type(method) is METHODS[name]
    assert set(options) == set(method_parameters(name)), "options() must record every parameter"
    for key, value in tiny(name)["options"].items():
        assert options[key] == value, key
    stored = json.loads(json.dumps(options))  # config.json and sweeps keep them as JSON
    again = build_method(name, stored)
    assert type(again) is METHODS[name] and again.options() == options
    assert build_method(name, again.options()).options() == options


def _config(name: str) -> RunConfig:
    return RunConfig(
        dataset="fashion-mnist",
        train=TrainConfig(epochs=EPOCHS, batch_size=20),
        method=name,
        method_options=tiny(name)["options"],
        crop_padding=0,
        **tiny(name).get("run", {}),
    )


def _run(data_dir: Path, out: Path, name: str, resume: bool = False) -> dict:
    env = Environment(data_dir=str(data_dir), download=False, device="cpu", progress=False)
    train_run(_config(name), out, env, resume=resume)
    return json.loads((out / "metrics.json").read_text())


def _releases(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.noisy.pt"))}


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "model.pt", weights_only=True)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_contract(name, data_dir, tmp_path, monkeypatch):
    tiny(name)
    draws: list[str] = []  # the names of the releases drawn in the current session
    epochs: list[int] = []  # the epochs trained in the current session, every stage's
    interrupt_at: list[int] = []  # stop before this many epochs (1-based), if given
    privatized, train_epoch = RunContext.privatized, loop.Trainer._train_epoch

    def spy_privatized(self, release, draw):
        def counted():
            draws.append(release)
            return draw()

        return privatized(self, release, counted)

    def spy_epoch(self, epoch):
        epochs.append(epoch)
        if interrupt_at and len(epochs) == interrupt_at[0]:
            raise KeyboardInterrupt
        return train_epoch(self, epoch)

    monkeypatch.setattr(RunContext, "privatized", spy_privatized)
    monkeypatch.setattr(loop.Trainer, "_train_epoch", spy_epoch)

    # An uninterrupted run.
    straight = tmp_path / "straight"
    metrics = _run(data_dir, straight, name)
    straight_draws, total = list(draws), len(epochs)
    assert total >= EPOCHS, "the tiny options must make the method train"

    # (a) ε "Infinity" (labeldp.records) iff non-private; finite and within the budget
    # otherwise.
    epsilon, entries = metrics["epsilon"], metrics["ledger"]["entries"]
    if is_private(name):
        assert epsilon is not None and math.isfinite(epsilon) and epsilon > 0
        assert epsilon <= tiny(name)["options"]["epsilon"] * (1 + 1e-9)
        assert entries, "a private run's ledger must say what the labels cost"
        assert metrics["delta"] is not None and 0 <= metrics["delta"] < 1
    else:
        assert epsilon == "Infinity" and metrics["delta"] is None and entries == []
        assert straight_draws == [] and _releases(straight) == {}
    assert metrics["method_options"] == build_method(name, tiny(name)["options"]).options()
    recorded = json.loads((straight / "config.json").read_text())["run"]
    assert RunConfig.from_dict(recorded).to_dict() == _config(name).to_dict()

    # (b) each release drawn once and stored as <release>.noisy.pt.
    assert all(n == 1 for n in Counter(straight_draws).values()), straight_draws
    assert set(_releases(straight)) == {f"{r}.noisy.pt" for r in straight_draws}

    # (c) a step's epoch statistics reach the history (labeldp-pro's projection norms).
    if name == "labeldp-pro":
        for entry in metrics["history"]:
            assert entry["projection_projected_norm"] > 0, entry
            assert entry["projection_noisy_norm"] > 0, entry

    # An interrupted run, stopped before its last epoch (of its last stage), ...
    out = tmp_path / "interrupted"
    draws.clear(), epochs.clear()
    interrupt_at.append(total)
    with pytest.raises(KeyboardInterrupt):
        _run(data_dir, out, name)
    assert not (out / "metrics.json").exists()
    first_draws, stored = list(draws), _releases(out)
    interrupt_at.clear()

    # ... and resumed: nothing drawn twice, the stored releases untouched.
    draws.clear(), epochs.clear()
    resumed = _run(data_dir, out, name, resume=True)
    assert not set(draws) & set(first_draws), f"drawn again on resume: {draws}"
    assert Counter(first_draws + draws) == Counter(straight_draws)
    after = _releases(out)
    assert {k: after.get(k) for k in stored} == stored, "a stored release was rewritten"
    assert after == _releases(straight)  # seeded: the same noise as the straight run

    # (d) the resumed run continued (not restarted) and ended where the straight one did.
    assert len(epochs) < total and resumed["resumed_from_epoch"] == EPOCHS - 1
    a, b = _weights(straight), _weights(out)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert resumed["test_accuracy"] == metrics["test_accuracy"]
    assert resumed["epsilon"] == metrics["epsilon"]
    assert resumed["ledger"] == metrics["ledger"]


def test_pate_fm_refuses_batch_norm_before_writing_the_run_folder(data_dir, tmp_path):
    """A refused run must leave its folder unwritten (see runner._train_run), so that the
    corrected command may use it."""
    out = tmp_path / "run"
    config = RunConfig(
        dataset="fashion-mnist",
        train=TrainConfig(epochs=EPOCHS, batch_size=20),
        method="pate-fm",
        method_options=tiny("pate-fm")["options"],
        crop_padding=0,
        norm="batch",
    )
    env = Environment(data_dir=str(data_dir), download=False, device="cpu", progress=False)
    with pytest.raises(ConfigError, match="BatchNorm"):
        train_run(config, out, env)
    assert not (out / "config.json").exists()
