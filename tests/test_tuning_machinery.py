"""The tuning machinery of issue 13 against independent computations: forward loss
correction, RR's channel and Bayes posterior, the validation split, collapse detection,
[grid] sweeps and their best-variant report, and training recipes (sweeps and the CLI).
Mixup is in test_mixup.py."""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from fakes import run_record, two_class_halves
from torch import nn

from labeldp import cli, recipes, runner
from labeldp.augment import Normalize
from labeldp.data import load_splits
from labeldp.errors import ConfigError
from labeldp.mechanisms import RandomizedResponse
from labeldp.methods import build_method, method_parameters
from labeldp.methods.rr import RRPosterior, rr_targets, rr_transition
from labeldp.models import build_model
from labeldp.recipes import Recipe
from labeldp.runner import Environment, RunConfig, prepare_data, train_run
from labeldp.store import ResultsStore, run_key
from labeldp.sweep import SweepSpec
from labeldp.train import TrainConfig
from labeldp.train.loop import COLLAPSE_SHARE, Trainer, collapsed, predict_logits, top_class_share
from labeldp.train.targets import (
    ForwardCorrectedLabels,
    HardLabels,
    TargetFn,
    target_loss,
)

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def no_recipes(monkeypatch):
    """Tests see no recipe unless they declare one (the real table may change)."""
    monkeypatch.setattr(recipes, "RECIPES", {"fashion-mnist": {}})


pytestmark = pytest.mark.fake_fashion(n_train=300, n_test=100)


def _env(data_dir) -> Environment:
    return Environment(data_dir=str(data_dir), download=False, progress=False, device="cpu")


# ------------------------------------------------------------- forward correction
def _random_channel(k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(k, k, generator=g, dtype=torch.float64) + 0.05
    return t / t.sum(dim=1, keepdim=True)


def test_forward_loss_equals_the_noisy_label_likelihood_in_float64():
    k, b = 5, 12
    g = torch.Generator().manual_seed(0)
    transition = _random_channel(k, 1)
    logits = torch.randn(b, k, generator=g) * 3
    noisy = torch.randint(0, k, (b,), generator=g)
    targets = ForwardCorrectedLabels(noisy, transition)
    p = torch.softmax(logits.double(), dim=1)
    q = p @ transition  # (B, K): P(ỹ = j | x) under the model
    want = -torch.log(q[torch.arange(b), noisy])
    got = targets.loss(logits, noisy, reduction="none")
    assert got.shape == (b,)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(targets.loss(logits, noisy).double(), want.mean(), rtol=1e-5,
                               atol=1e-6)  # fmt: skip
    # soft (mixed) targets: the cross-entropy against q
    soft = torch.softmax(torch.randn(b, k, generator=g), dim=1)
    want_soft = -(soft.double() * torch.log(q)).sum(dim=1)
    got_soft = targets.loss(logits, soft, reduction="none")
    torch.testing.assert_close(got_soft.double(), want_soft, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(targets.loss(logits, soft).double(), want_soft.mean(), rtol=1e-5,
                               atol=1e-6)  # fmt: skip
    # correcting for noise is not plain cross-entropy
    assert not torch.allclose(got, target_loss(logits, noisy, "none"), atol=1e-3)


def test_forward_loss_gradient_matches_the_analytic_one():
    """∂/∂z_i of −log q_ỹ, q = softmax(z)·T, is p_i − p_i T[i, ỹ] / q_ỹ. (The loss works in
    float32 whatever the logits' dtype, so torch.autograd.gradcheck in float64 cannot apply;
    the analytic gradient is compared instead.)"""
    k, b = 4, 6
    g = torch.Generator().manual_seed(3)
    transition = _random_channel(k, 4)
    z = (torch.randn(b, k, generator=g) * 2).requires_grad_(True)
    noisy = torch.randint(0, k, (b,), generator=g)
    ForwardCorrectedLabels(noisy, transition).loss(z, noisy, reduction="none").sum().backward()
    with torch.no_grad():
        p = torch.softmax(z.double(), dim=1)
        column = transition[:, noisy].T  # (B, K): T[i, ỹ_b]
        q = (p * column).sum(dim=1, keepdim=True)
        want = p - p * column / q
    torch.testing.assert_close(z.grad.double(), want, rtol=1e-4, atol=1e-6)


def test_forward_loss_with_the_identity_channel_is_cross_entropy():
    k, b = 6, 10
    g = torch.Generator().manual_seed(5)
    noisy = torch.randint(0, k, (b,), generator=g)
    targets = ForwardCorrectedLabels(noisy, torch.eye(k))
    z1 = torch.randn(b, k, generator=g).requires_grad_(True)
    z2 = z1.detach().clone().requires_grad_(True)
    got = targets.loss(z1, noisy)
    want = F.cross_entropy(z2, noisy)
    torch.testing.assert_close(got, want)
    got.backward()
    want.backward()
    torch.testing.assert_close(z1.grad, z2.grad)
    soft = torch.softmax(torch.randn(b, k, generator=g), dim=1)
    torch.testing.assert_close(
        targets.loss(z1, soft, "none"), target_loss(z1, soft, "none"), rtol=1e-5, atol=1e-6
    )


def test_only_forward_correction_brings_its_own_loss():
    noisy = torch.tensor([0, 1, 2])
    forward = ForwardCorrectedLabels(noisy, torch.full((3, 3), 1 / 3))
    z, t = torch.randn(3, 3), torch.tensor([0, 2, 1])
    assert not torch.allclose(forward.loss(z, t), target_loss(z, t))
    for plain in (HardLabels(noisy), RRPosterior(noisy, 1.0, 3)):
        assert type(plain).loss is TargetFn.loss
        torch.testing.assert_close(plain.loss(z, t), target_loss(z, t))
    with pytest.raises(ValueError, match="row-stochastic"):
        ForwardCorrectedLabels(noisy, torch.full((3, 3), 0.5))
    with pytest.raises(ValueError, match="row-stochastic"):
        ForwardCorrectedLabels(noisy, torch.full((3, 2), 0.5))


# ------------------------------------------------------------------ RR learning
@pytest.mark.parametrize("epsilon,k", [(0.5, 10), (1.0, 4), (3.0, 2)])
def test_rr_transition_is_rrs_channel(epsilon, k):
    mech = RandomizedResponse(epsilon, k)
    t = rr_transition(mech, CPU)
    assert t.shape == (k, k) and t.dtype == torch.float64
    torch.testing.assert_close(t.sum(dim=1), torch.ones(k, dtype=torch.float64))
    keep = torch.exp(torch.tensor(epsilon, dtype=torch.float64)) / (
        torch.exp(torch.tensor(epsilon, dtype=torch.float64)) + k - 1
    )
    torch.testing.assert_close(t.diagonal(), torch.full((k,), mech.keep_probability,
                                                        dtype=torch.float64))  # fmt: skip
    torch.testing.assert_close(t.diagonal(), keep.expand(k))
    off = t[~torch.eye(k, dtype=torch.bool)]
    torch.testing.assert_close(off, torch.full_like(off, float((1 - keep) / (k - 1))))
    # ε-DP ratio of the channel: max T[k,j] / T[k',j] = e^ε
    ratio = (t.max(dim=0).values / t.min(dim=0).values).max()
    torch.testing.assert_close(ratio, torch.tensor(epsilon, dtype=torch.float64).exp())


def test_rr_transition_matches_the_empirical_channel_of_privatize():
    """Pearson χ² of the counts of ỹ for each true label against n·T[k]: the sum over
    K = 4 rows has K(K−1) = 12 degrees of freedom; its 0.999 quantile is 32.91."""
    k, n, epsilon = 4, 5000, 0.8
    mech = RandomizedResponse(epsilon, k)
    t = rr_transition(mech, CPU)
    labels = torch.arange(k).repeat_interleave(n)
    noisy = mech.privatize(labels, torch.Generator().manual_seed(17))
    counts = torch.zeros(k, k, dtype=torch.float64)
    counts.index_put_((labels, noisy), torch.ones(k * n, dtype=torch.float64), accumulate=True)
    expected = n * t
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 32.91, chi2
    # and it is not the channel of another ε (power check: ε 1.2 would be rejected)
    other = n * rr_transition(RandomizedResponse(1.2, k), CPU)
    assert ((counts - other) ** 2 / other).sum().item() > 32.91


def test_rr_posterior_is_the_bayes_posterior():
    k, n, epsilon = 5, 30, 1.3
    g = torch.Generator().manual_seed(8)
    noisy = torch.randint(0, k, (n,), generator=g)
    indices = torch.tensor([3, 0, 29, 17, 17, 8])
    logits = torch.randn(len(indices), k, generator=g) * 2
    t = rr_transition(RandomizedResponse(epsilon, k), CPU)
    got = RRPosterior(noisy, epsilon, k)(indices, logits)
    prior = torch.softmax(logits.double(), dim=1)
    want = torch.empty(len(indices), k, dtype=torch.float64)
    for row, index in enumerate(indices.tolist()):
        observed = int(noisy[index])
        joint = [prior[row, y] * t[y, observed] for y in range(k)]  # P(y) P(ỹ | y)
        total = sum(joint)
        for y in range(k):
            want[row, y] = joint[y] / total
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.sum(dim=1), torch.ones(len(indices)))


def test_rr_targets_follow_the_learning_option():
    mech = RandomizedResponse(1.0, 3)
    noisy = torch.tensor([0, 2, 1, 1])
    plain = rr_targets("plain", noisy, mech)
    assert type(plain) is HardLabels and torch.equal(plain.labels, noisy)
    forward = rr_targets("forward", noisy, mech)
    assert isinstance(forward, ForwardCorrectedLabels)
    torch.testing.assert_close(forward.transition, rr_transition(mech, CPU).float())
    posterior = rr_targets("posterior", noisy, mech)
    assert isinstance(posterior, RRPosterior) and posterior.epsilon == 1.0


@pytest.mark.parametrize("method", ["rr", "lp-2st"])
def test_the_learning_option_validates_and_round_trips(method):
    for learning in ("plain", "forward", "posterior"):
        built = build_method(method, {"epsilon": 2.0, "learning": learning})
        options = built.options()
        assert options["learning"] == learning
        # lp-2st's options() also records "stages" (2), which its constructor fixes
        accepted = {k: v for k, v in options.items() if k in method_parameters(method)}
        assert accepted["learning"] == learning
        assert build_method(method, accepted).options() == options
    assert build_method(method, {"epsilon": 2.0}).options()["learning"] == "plain"
    for bad in ("Plain", "backward", "", None, 1):
        with pytest.raises(ConfigError, match="learning"):
            build_method(method, {"epsilon": 2.0, "learning": bad})


# ----------------------------------------------------------------- validation split
def _rows(dataset) -> list[tuple[bytes, int]]:
    return [
        (dataset.images[i].numpy().tobytes(), int(dataset.labels[i])) for i in range(len(dataset))
    ]


def _config(**kw) -> RunConfig:
    train = kw.pop("train", TrainConfig(epochs=1, batch_size=50))
    return RunConfig(dataset="fashion-mnist", train=train, crop_padding=0, **kw)


def test_the_validation_split_partitions_the_training_split(data_dir):
    env = _env(data_dir)
    full, test = load_splits("fashion-mnist", data_dir=str(data_dir), download=False, device=CPU)
    everything = _rows(full)
    assert len(set(everything)) == len(everything) == 300  # the fake images are unique
    train, val = prepare_data(_config(validation_size=70), env)
    train_rows, val_rows = _rows(train), _rows(val)
    assert len(val_rows) == 70 and len(train_rows) == 230
    assert not set(train_rows) & set(val_rows)
    assert sorted(train_rows + val_rows) == sorted(everything)  # images with their labels
    assert set(val_rows).isdisjoint(_rows(test))
    # not simply the first or last examples
    assert set(val_rows) != set(everything[:70]) and set(val_rows) != set(everything[-70:])
    # the same split for every run seed; train_size subsets the rest
    for seed in (1, 7):
        config = _config(validation_size=70, train=TrainConfig(epochs=1, seed=seed))
        other_train, other_val = prepare_data(config, env)
        assert _rows(other_val) == val_rows and _rows(other_train) == train_rows
    small, val2 = prepare_data(
        _config(validation_size=70, train_size=50, train=TrainConfig(epochs=1, seed=3)), env
    )
    assert _rows(val2) == val_rows and len(small) == 50
    assert set(_rows(small)) <= set(train_rows)
    # without validation_size the evaluation split is the test split
    plain_train, plain_eval = prepare_data(_config(), env)
    assert _rows(plain_eval) == _rows(test) and len(plain_train) == 300


@pytest.mark.parametrize("bad", [0, -5, True, 2.5, "10"])
def test_validation_size_must_be_a_positive_integer(bad):
    with pytest.raises(ConfigError, match="validation_size"):
        _config(validation_size=bad)


def test_validation_size_must_leave_a_training_example(data_dir):
    env = _env(data_dir)
    for bad in (300, 301, 10_000):
        with pytest.raises(ConfigError, match="validation_size"):
            prepare_data(_config(validation_size=bad), env)
    train, val = prepare_data(_config(validation_size=299), env)
    assert len(train) == 1 and len(val) == 299
    with pytest.raises(ConfigError, match="train_size"):  # train_size counts what is left
        prepare_data(_config(validation_size=100, train_size=201), env)


def test_a_validation_run_is_scored_and_stored_on_the_validation_split(data_dir, tmp_path):
    config = _config(validation_size=100, method="rr", method_options={"epsilon": 2.0,
                     "learning": "forward"})  # fmt: skip
    out = tmp_path / "run"
    metrics = train_run(config, out, _env(data_dir))
    assert metrics.evaluation_split == "validation"
    assert metrics.test_accuracy is None
    acc = metrics.validation_accuracy
    assert 0 <= acc <= 1 and metrics.history[-1].test_accuracy == acc
    assert metrics.train_size == 200
    # recompute the accuracy of the saved model on the validation split
    train, val = prepare_data(config, _env(data_dir))
    model = build_model("cnn", num_classes=10, in_channels=1, image_size=28, norm="batch")
    model.load_state_dict(torch.load(out / "model.pt"))
    info = train.info
    logits = predict_logits(model, val.images, Normalize(info.mean, info.std))
    assert (logits.argmax(dim=1) == val.labels).float().mean().item() == pytest.approx(acc)
    assert metrics.evaluation_accuracy == acc
    store = ResultsStore(tmp_path / "runs.sqlite")
    store.record("s", "rr", config.to_dict(), out, metrics, None, "2026-01-01T00:00:00")
    (row,) = store.rows("s")
    assert row["test_accuracy"] == pytest.approx(acc)
    assert dataclasses.replace(metrics, evaluation_split="test", test_accuracy=0.25,
                               validation_accuracy=0.75).evaluation_accuracy == 0.25  # fmt: skip


# -------------------------------------------------------------------- collapse
def test_top_class_share_and_collapsed_on_hand_made_logits():
    logits = torch.tensor([[5.0, 0, 0], [4, 1, 0], [0, 3, 0], [0, 0, 2]])  # argmax 0,0,1,2
    assert top_class_share(logits) == 0.5
    assert top_class_share(torch.tensor([[0.0, 1, 0]] * 7 + [[1.0, 0, 0]] * 3)) == pytest.approx(
        0.7
    )
    assert top_class_share(torch.eye(4)) == 0.25
    assert COLLAPSE_SHARE == 0.5
    assert not collapsed(0.5, 10)  # strictly more than the share
    assert collapsed(0.5001, 3) and collapsed(1.0, 10)
    assert not collapsed(1.0, 2)  # K = 2 never collapses
    assert not collapsed(None, 10)


class Constant(nn.Module):
    """Predicts class ``label`` of ``k`` whatever the input (a trainable dummy weight)."""

    def __init__(self, k: int, label: int = 2) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))
        self.base = torch.full((k,), -1.0)
        self.base[label] = 1.0

    def forward(self, x):
        return self.base.expand(x.shape[0], -1) + 0 * self.dummy


@pytest.mark.parametrize("k,expect", [(3, True), (10, True), (2, False)])
def test_a_constant_model_is_marked_collapsed(k, expect):
    images, labels = two_class_halves(60)
    trainer = Trainer(
        Constant(k, label=1),
        images,
        HardLabels(labels),
        TrainConfig(epochs=1, batch_size=20),
        normalize=Normalize([0.5], [0.5]),
        test_images=images[:30],
        test_labels=labels[:30],
        progress=False,
    )
    fit = trainer.fit()
    (entry,) = fit.history
    assert entry.top_class_share == 1.0
    assert entry.collapsed is expect and fit.collapsed is expect
    assert fit.test_accuracy == pytest.approx((labels[:30] == 1).float().mean().item())


def test_a_balanced_model_is_not_collapsed():
    images, labels = two_class_halves(40)
    trainer = Trainer(
        nn.Sequential(nn.Flatten(), nn.Linear(64, 3)),
        images,
        HardLabels(labels),
        TrainConfig(epochs=1, batch_size=20),
        normalize=Normalize([0.5], [0.5]),
        progress=False,
    )
    assert trainer.fit().collapsed is False  # no evaluation split: nothing measured


def test_a_collapsed_run_records_outcome_collapsed(data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "build_model", lambda *a, num_classes, **kw: Constant(num_classes))
    metrics = train_run(_config(), tmp_path / "c", _env(data_dir))
    assert metrics.outcome == "collapsed"
    assert metrics.history[-1].collapsed is True
    assert metrics.history[-1].top_class_share == 1.0
    saved = json.loads((tmp_path / "c" / "metrics.json").read_text())
    assert saved["outcome"] == "collapsed"


# ---------------------------------------------------------------------- [grid]
GRID = """
name = "g"
dataset = "fashion-mnist"
methods = ["rr", "alibi"]
epsilons = [1, 4]
seeds = [0, 1]
crop_padding = 0
{extra_top}

[train]
epochs = 1
batch_size = 50
lr = 0.3

[method_options.rr]
learning = "forward"

[grid]
"train.lr" = [0.01, 0.05]
"rr.learning" = ["plain", "posterior"]
{extra_grid}
"""


def _grid_file(tmp_path, text=None, **fmt) -> Path:
    fmt = {"extra_top": "", "extra_grid": "", **fmt}
    path = tmp_path / "g.toml"
    path.write_text((text or GRID).format(**fmt))
    return path


def test_the_grid_is_a_product_with_variant_names(tmp_path):
    spec = SweepSpec.load(_grid_file(tmp_path))
    lrs, learnings = [0.01, 0.05], ["plain", "posterior"]
    want = []
    for seed in (0, 1):
        want += [f"none-lr{lr}-seed{seed}" for lr in lrs]
        for eps in (1, 4):
            want += [
                f"rr-eps{eps}-lr{lr}-learning{learning}-seed{seed}"
                for lr, learning in itertools.product(lrs, learnings)
            ]
        for eps in (1, 4):
            want += [f"alibi-eps{eps}-lr{lr}-seed{seed}" for lr in lrs]
    points = spec.points()
    assert [name for name, _, _ in points] == want and len(want) == 2 * (2 + 8 + 4)
    for name, config, variant in points:
        # the grid value wins over [train] lr = 0.3 and [method_options.rr] learning
        assert variant in name and f"lr{config.train.lr}" in variant
        assert config.train.lr in lrs and config.train.epochs == 1
        if config.method == "rr":
            assert variant == f"lr{config.train.lr}-learning{config.method_options['learning']}"
            assert config.method_options["learning"] in learnings
        else:
            assert "learning" not in config.method_options
    variants = spec.variants()
    assert len(variants) == len(points)  # every point is a distinct configuration
    assert {variants[run_key(c.to_dict())] for _, c, _ in points if c.method == "alibi"} == {
        "lr0.01",
        "lr0.05",
    }
    assert spec.grid_keys("rr") == ["train.lr", "rr.learning"]
    assert spec.grid_keys("alibi") == ["train.lr"]


def test_grid_values_override_per_method_and_shared_values(tmp_path):
    text = (
        GRID
        + '"crop_padding" = [1, 2]\n\n[per_method.rr]\nnorm = "group"\n'
        + "[per_method.rr.train]\nlr = 0.7\n"
    )
    spec = SweepSpec.load(_grid_file(tmp_path, text=text))
    assert len(spec.runs()) == 2 * 2 * (2 + 8 + 4)
    for name, config in spec.runs():
        assert config.train.lr in (0.01, 0.05) and config.crop_padding in (1, 2)
        assert f"crop_padding{config.crop_padding}" in name
        assert config.norm == ("group" if config.method == "rr" else "batch")
    without = SweepSpec.load(_grid_file(tmp_path, text=GRID.split("[grid]")[0]))
    assert [n for n, _ in without.runs()][:2] == ["none-seed0", "rr-eps1-seed0"]
    assert all(c.train.lr == 0.3 for _, c in without.runs())
    assert set(without.variants().values()) == {""}


@pytest.mark.parametrize(
    "line,named",
    [
        ('"train.momentumm" = [0.9]', "train.momentumm"),
        ('"train.seed" = [1, 2]', "train.seed"),
        ('"dp-sgd.noise_multiplier" = [1.0]', "dp-sgd.noise_multiplier"),
        ('"magic.x" = [1]', "magic.x"),
        ('"rr.noise" = [1]', "rr.noise"),
        ('"rr.epsilon" = [1, 2]', "rr.epsilon"),
        ('"alibi.learning" = ["forward"]', "alibi.learning"),
        ('"colour" = [1]', "colour"),
        ('"train.batch_size" = []', "train.batch_size"),
        ('"train.batch_size" = [10, 20, 10]', "train.batch_size"),
        ('"train.batch_size" = 10', "train.batch_size"),
        ('"train.batch_size" = {a = 1}', "train.batch_size"),
    ],
)
def test_bad_grid_keys_are_named(tmp_path, line, named):
    path = _grid_file(tmp_path, extra_grid=line)
    with pytest.raises(ConfigError) as info:
        SweepSpec.load(path)
    assert named in str(info.value) and str(path) in str(info.value)


def test_a_grid_that_is_not_a_table_is_refused(tmp_path):
    text = GRID.split("[grid]")[0]
    with pytest.raises(ConfigError, match="grid must be a table"):
        SweepSpec.load(_grid_file(tmp_path, text=text, extra_top="grid = [1, 2]"))


def test_recipes_key_must_be_a_boolean(tmp_path):
    with pytest.raises(ConfigError, match="recipes"):
        SweepSpec.load(_grid_file(tmp_path, extra_top='recipes = "no"'))
    assert SweepSpec.load(_grid_file(tmp_path, extra_top="recipes = false")).recipes is False
    assert SweepSpec.load(_grid_file(tmp_path)).recipes is True


def _report_of_rr_grid(tmp_path, split: str, accuracy: dict[str, float]):
    """The report (md, csv paths) of the one-seed rr grid at ε = 1 (and the non-private
    run), its lr listed out of string order (0.05 before 0.01), every run stored with
    ``accuracy[variant]`` on ``split``."""
    from labeldp.report import write_report

    text = GRID.replace("seeds = [0, 1]", "seeds = [0]").replace('methods = ["rr", "alibi"]',
                                                                 'methods = ["rr"]')  # fmt: skip
    text = text.replace("epsilons = [1, 4]", "epsilons = [1]")
    text = text.replace('"train.lr" = [0.01, 0.05]', '"train.lr" = [0.05, 0.01]')
    spec = SweepSpec.load(_grid_file(tmp_path, text=text))
    store = ResultsStore(tmp_path / "runs.sqlite")
    for name, config, variant in spec.points():
        eps = config.method_options.get("epsilon")
        scored = {f"{split}_accuracy": accuracy[variant]}
        metrics = run_record(
            method=config.method,
            epsilon=eps,
            delta=None if eps is None else 0.0,
            evaluation_split=split,
            train_seconds=1.0,
            ledger={"entries": []},
            **({"test_accuracy": None} | scored),
        )
        store.record(spec.name, name, config.to_dict(), "/x", metrics, None, "2026-01-01")
    return write_report(store, spec, "g.toml", tmp_path / "results")


def test_the_report_has_a_row_per_variant_and_picks_the_best(tmp_path):
    accuracy = {  # rr ε=1: posterior at lr 0.05 is best, plain at lr 0.01 runner-up
        "lr0.01-learningplain": 0.61,
        "lr0.01-learningposterior": 0.40,
        "lr0.05-learningplain": 0.30,
        "lr0.05-learningposterior": 0.72,
        "lr0.01": 0.80,
        "lr0.05": 0.90,
    }
    md, csv = _report_of_rr_grid(tmp_path, "validation", accuracy)
    text = md.read_text()
    assert "## Validation accuracy (%)" in text
    for variant in ("lr0.01-learningplain", "lr0.05-learningposterior", "lr0.01-learningposterior",
                    "lr0.05-learningplain"):  # fmt: skip
        assert f"| rr [{variant}] | {100 * accuracy[variant]:.2f} |" in text
    assert "| none (ε = ∞) [lr0.05] | 90.00 |" in text
    rows = [line.split("]")[0] for line in text.splitlines() if line.startswith("| rr [")]
    assert rows == [  # the grid's order, not the strings'
        "| rr [lr0.05-learningplain",
        "| rr [lr0.05-learningposterior",
        "| rr [lr0.01-learningplain",
        "| rr [lr0.01-learningposterior",
    ]
    best = text.split("## Best variant per method and ε")[1]
    assert "| rr | 1 | lr0.05-learningposterior | 72.00 | lr0.01-learningplain | 61.00 |" in best
    assert "| none | ∞ | lr0.05 | 90.00 | lr0.01 | 80.00 |" in best
    assert len(csv.read_text().splitlines()) == 1 + 4 + 2


# ---------------------------------------------------------------------- recipes
RR_RECIPE = dict(
    train={"epochs": 3, "lr": 0.02, "mixup_alpha": 0.5, "weight_decay": 1e-3},
    run={"norm": "group", "crop_padding": 2},
    options={"learning": "forward"},
)

RECIPE_SWEEP = """
name = "r"
dataset = "fashion-mnist"
methods = ["rr"]
epsilons = [1]
include_nonprivate = false
{extra}
"""


@pytest.mark.parametrize(
    "kwargs,fragment",
    [
        ({"train": {"colour": 1}}, "recipe train fields"),
        ({"train": {"seed": 1}}, "recipe train fields"),
        ({"run": {"dataset": "mnist"}}, "recipe run fields"),
        ({"run": {"train_size": 10}}, "recipe run fields"),
        ({"options": {"epsilon": 1.0}}, "epsilon"),
    ],
)
def test_recipes_are_validated(kwargs, fragment):
    with pytest.raises(ConfigError, match=fragment):
        Recipe(**kwargs)


def test_a_recipe_is_read_only_and_serializable():
    r = Recipe(**RR_RECIPE, tuned="x")
    with pytest.raises(TypeError):
        r.train["lr"] = 1.0  # type: ignore[index]
    assert r.to_dict() == {**{k: dict(v) for k, v in RR_RECIPE.items()}, "tuned": "x"}
    assert recipes.recipe("rr", "cifar10") == Recipe()


@pytest.fixture
def rr_recipe(monkeypatch):
    monkeypatch.setattr(recipes, "RECIPES", {"fashion-mnist": {"rr": Recipe(**RR_RECIPE)}})


def _recipe_spec(tmp_path, extra=""):
    path = tmp_path / "r.toml"
    path.write_text(RECIPE_SWEEP.format(extra=extra))
    return SweepSpec.load(path)


def test_a_sweep_starts_from_the_recipe(tmp_path, rr_recipe):
    ((_, config),) = _recipe_spec(tmp_path).runs()  # no [train]: epochs from the recipe
    assert (config.train.epochs, config.train.lr, config.train.mixup_alpha) == (3, 0.02, 0.5)
    assert config.train.weight_decay == 1e-3 and config.train.momentum == 0.9
    assert (config.norm, config.crop_padding) == ("group", 2)
    assert config.method_options == {"epsilon": 1.0, "learning": "forward"}


def test_sweep_values_override_the_recipe_in_order(tmp_path, rr_recipe):
    top = 'norm = "batch"\n[train]\nlr = 0.03\n[method_options.rr]\nlearning = "posterior"\n'
    ((_, config),) = _recipe_spec(tmp_path, top).runs()
    assert (config.train.lr, config.train.epochs, config.norm) == (0.03, 3, "batch")
    assert config.crop_padding == 2 and config.method_options["learning"] == "posterior"
    per = top + '[per_method.rr]\nnorm = "group"\ncrop_padding = 0\ntrain = {lr = 0.04}\n'
    ((_, config),) = _recipe_spec(tmp_path, per).runs()
    assert (config.train.lr, config.norm, config.crop_padding) == (0.04, "group", 0)
    grid = per + '[grid]\n"train.lr" = [0.05]\n"rr.learning" = ["plain"]\n"norm" = ["batch"]\n'
    ((_, config),) = _recipe_spec(tmp_path, grid).runs()
    assert (config.train.lr, config.norm, config.method_options["learning"]) == (
        0.05,
        "batch",
        "plain",
    )
    assert config.train.mixup_alpha == 0.5  # what nobody overrides stays the recipe's


def test_recipes_false_ignores_the_recipe(tmp_path, rr_recipe):
    with pytest.raises(ConfigError, match="epochs") as info:
        _recipe_spec(tmp_path, "recipes = false")
    assert "recipes = false" in str(info.value)
    ((_, config),) = _recipe_spec(tmp_path, "recipes = false\n[train]\nepochs = 2\n").runs()
    defaults = TrainConfig(epochs=2)
    assert config.train == TrainConfig(epochs=2, seed=0) == defaults
    assert (config.norm, config.crop_padding) == ("batch", None)
    assert config.method_options == {"epsilon": 1.0}


def test_the_recipe_applies_to_its_method_only(tmp_path, rr_recipe):
    path = tmp_path / "r.toml"
    path.write_text(
        RECIPE_SWEEP.format(extra="").replace("include_nonprivate = false", "")
        + "[train]\nepochs = 1\n"
    )
    spec = SweepSpec.load(path)
    configs = dict(spec.runs())
    assert configs["none-seed0"].train == TrainConfig(epochs=1)
    assert configs["none-seed0"].norm == "batch"
    assert configs["rr-eps1-seed0"].train.epochs == 1  # [train] beats the recipe
    assert configs["rr-eps1-seed0"].train.lr == 0.02


def _cli_config(monkeypatch, tmp_path, *flags) -> RunConfig:
    seen = []

    def fake_train_run(config, out, env, resume=False):
        seen.append(config)
        return run_record(model=config.model_name, train_size=1, test_accuracy=0.5,
                          epsilon=1.0, train_seconds=0.0, device="cpu")  # fmt: skip

    monkeypatch.setattr(cli, "train_run", fake_train_run)
    argv = ["train", "--dataset", "fashion-mnist", "--method", "rr", "--epsilon", "1",
            "--out", str(tmp_path / "out"), "--quiet", *flags]  # fmt: skip
    assert cli.main(argv) == 0
    (config,) = seen
    return config


def test_the_cli_fills_unset_flags_from_the_recipe(monkeypatch, tmp_path, rr_recipe):
    config = _cli_config(monkeypatch, tmp_path)
    assert (config.train.epochs, config.train.lr, config.train.mixup_alpha) == (3, 0.02, 0.5)
    assert config.train.weight_decay == 1e-3
    assert (config.norm, config.crop_padding) == ("group", 2)
    assert config.method_options["learning"] == "forward"
    given = _cli_config(
        monkeypatch, tmp_path, "--lr", "0.07", "--norm", "batch", "--learning", "posterior",
        "--mixup", "0", "--epochs", "1",
    )  # fmt: skip
    assert (given.train.lr, given.train.mixup_alpha, given.train.epochs) == (0.07, 0.0, 1)
    assert given.norm == "batch" and given.crop_padding == 2
    assert given.method_options["learning"] == "posterior"
    assert given.train.weight_decay == 1e-3


def test_the_cli_without_a_recipe_uses_the_defaults(monkeypatch, tmp_path):
    config = _cli_config(monkeypatch, tmp_path)
    assert config.train == TrainConfig(epochs=cli.DEFAULT_EPOCHS)
    assert config.norm == "batch" and config.crop_padding is None
    assert config.method_options == {"epsilon": 1.0}


def test_a_bad_grid_value_names_the_option(tmp_path):
    path = _grid_file(tmp_path, text=GRID.replace('"plain", "posterior"', '"plain", "bogus"'))
    with pytest.raises(ConfigError, match="learning") as info:
        SweepSpec.load(path)
    assert str(path) in str(info.value)
    path = _grid_file(tmp_path, text=GRID.replace("[0.01, 0.05]", "[0.01, -1]"))
    with pytest.raises(ConfigError, match="lr must be"):
        SweepSpec.load(path)


def test_a_grid_value_of_the_wrong_type_names_the_key(tmp_path):
    path = _grid_file(tmp_path, text=GRID.replace("[0.01, 0.05]", '[0.01, "fast"]'))
    with pytest.raises(ConfigError) as info:
        SweepSpec.load(path)
    assert "train.lr" in str(info.value)


def test_a_grid_scored_on_the_test_split_gets_no_best_variant_section(tmp_path):
    """A [grid] sweep evaluated on the test split is a comparison (e.g. two models), never
    a choice: its report names no "best variant"."""
    variants = ["lr0.01-learningplain", "lr0.01-learningposterior", "lr0.05-learningplain",
                "lr0.05-learningposterior", "lr0.01", "lr0.05"]  # fmt: skip
    md, _ = _report_of_rr_grid(tmp_path, "test", {v: 0.5 + i / 100 for i, v in enumerate(variants)})
    report = md.read_text()
    assert "## Test accuracy (%)" in report and "| rr [lr0.01-learningplain] |" in report
    assert "Best variant" not in report
