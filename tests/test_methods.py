"""Training methods end to end on tiny generated data: what they draw, when, and what the
ledger says."""

from __future__ import annotations

import json

import pytest
import torch
from fakes import count_calls as _count_calls
from fakes import tiny_run as _run

from labeldp import cli
from labeldp.errors import ConfigError
from labeldp.mechanisms import Alibi, RandomizedResponse
from labeldp.methods import build_method
from labeldp.methods.alibi import AlibiTargets
from labeldp.methods.lp_mst import paper_setting


def test_rr_randomizes_each_label_once_and_records_it(data_dir, tmp_path, monkeypatch):
    calls = _count_calls(monkeypatch, RandomizedResponse)
    metrics = _run(data_dir, tmp_path / "rr", "rr", epsilon=2.0)
    assert len(calls) == 1
    assert metrics.epsilon == 2.0 and metrics.delta == 0.0
    (entry,) = metrics.ledger["entries"]
    assert entry["mechanism"] == "randomized-response" and entry["examples"] == 400
    assert metrics.ledger["relation"] == entry["relation"] == "replace one label"
    assert entry["event"]["class_name"] == "RandomizedResponseDpEvent"
    noisy = torch.load(tmp_path / "rr" / "rr.noisy.pt")
    assert noisy.shape == (400,) and noisy.dtype == torch.int64


def test_a_resumed_run_reuses_the_stored_noise_and_never_redraws(data_dir, tmp_path, monkeypatch):
    out = tmp_path / "secure"
    from labeldp.train import loop

    original = loop.Trainer._train_epoch

    def interrupt(self, epoch):
        if epoch == 1:
            raise KeyboardInterrupt
        return original(self, epoch)

    monkeypatch.setattr(loop.Trainer, "_train_epoch", interrupt)
    with pytest.raises(KeyboardInterrupt):
        _run(data_dir, out, "alibi", epochs=2, epsilon=1.0, secure_noise=True)
    stored = torch.load(out / "alibi.noisy.pt")
    monkeypatch.setattr(loop.Trainer, "_train_epoch", original)
    calls = _count_calls(monkeypatch, Alibi)
    metrics = _run(data_dir, out, "alibi", epochs=2, resume=True, epsilon=1.0, secure_noise=True)
    assert calls == []  # secure noise drawn again would be a second release of the labels
    assert torch.equal(torch.load(out / "alibi.noisy.pt"), stored)
    assert metrics.epsilon == 1.0 and metrics.resumed_from_epoch == 1


def test_alibi_draws_noise_once_and_uses_the_same_noise_every_epoch(
    data_dir, tmp_path, monkeypatch
):
    calls = _count_calls(monkeypatch, Alibi)
    seen: dict[int, list[torch.Tensor]] = {}
    original = AlibiTargets.__call__

    def spy(self, indices, logits):
        for i, row in zip(indices.tolist(), self.noisy[indices], strict=True):
            seen.setdefault(i, []).append(row.clone())
        return original(self, indices, logits)

    monkeypatch.setattr(AlibiTargets, "__call__", spy)
    metrics = _run(data_dir, tmp_path / "alibi", "alibi", epochs=3, epsilon=1.0)
    assert len(calls) == 1
    assert len(seen) == 400 and all(len(rows) == 3 for rows in seen.values())
    assert all(torch.equal(rows[0], rows[-1]) for rows in seen.values())
    (entry,) = metrics.ledger["entries"]
    assert entry["mechanism"] == "alibi" and entry["details"]["noise"] == "laplace"
    assert entry["details"]["scale"] == pytest.approx(2.0)


def test_alibi_targets_are_the_posterior_under_the_model_prior():
    mech = Alibi(1.0, 4)
    noisy = mech.privatize(torch.tensor([0, 1, 2, 3]), torch.Generator().manual_seed(0))
    logits = torch.randn(4, 4, generator=torch.Generator().manual_seed(1))
    targets = AlibiTargets(mech, noisy, prior="model")(torch.arange(4), logits)
    torch.testing.assert_close(targets, mech.posterior(noisy, torch.softmax(logits, 1)))
    flat = AlibiTargets(mech, noisy, prior="uniform")(torch.arange(4), logits)
    torch.testing.assert_close(flat, mech.posterior(noisy))


def test_lp_mst_split_does_not_depend_on_labels(data_dir, tmp_path, monkeypatch):
    # Two datasets with the same images count but different labels get the same split.
    from labeldp.data import random_partition

    a = random_partition(400, [0.6, 0.2, 0.2], 5)
    b = random_partition(400, [0.6, 0.2, 0.2], 5)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    metrics = _run(data_dir, tmp_path / "lp3", "lp-mst", epochs=1, epsilon=4.0, stages=3)
    assert len(metrics.ledger["entries"]) == 3 and metrics.epsilon == 4.0


def test_paper_settings_by_nearest_epsilon():
    assert paper_setting(1.0) == (0.8, 0.6)
    assert paper_setting(0.5) == (0.8, 0.6)
    assert paper_setting(3.0) == (0.6, 0.5)  # log-nearest to 4
    assert paper_setting(2.5) == (0.7, 0.5)
    assert paper_setting(100.0) == (0.6, 0.5)


@pytest.mark.parametrize(
    "name,options,fragment",
    [
        ("rr", {}, "method rr needs options: epsilon"),
        ("rr", {"epsilon": 0.0}, "epsilon must be a finite number > 0"),
        ("rr", {"epsilon": 1.0, "stages": 2}, "does not take stages"),
        ("lp-mst", {"epsilon": 1.0, "stages": 1}, "stages must be an integer ≥ 2"),
        ("lp-mst", {"epsilon": 1.0, "stage_fractions": [0.5, 0.6]}, "summing to 1"),
        ("alibi", {"epsilon": 1.0, "noise": "gaussian"}, "delta must be in (0, 1)"),
        ("alibi", {"epsilon": 1.0, "prior": "flat"}, "prior must be one of"),
    ],
)
def test_method_options_are_validated(name, options, fragment):
    with pytest.raises(ConfigError) as info:
        build_method(name, options)
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["--method", "rr"], "--method rr needs --epsilon"),
        (["--method", "none", "--epsilon", "1"], "--epsilon does not apply to --method none"),
        (["--method", "rr", "--epsilon", "1", "--stages", "3"], "--stages does not apply"),
        (["--method", "alibi", "--epsilon", "1", "--alibi-noise", "gaussian"], "delta must be in"),
    ],
)
def test_cli_method_option_errors(args, fragment, data_dir, tmp_path, capsys):
    argv = [
        "train",
        "--dataset",
        "fashion-mnist",
        *args,
        "--data-dir",
        str(data_dir),
        "--out",
        str(tmp_path / "x"),
        "--quiet",
    ]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert fragment in err and len(err.strip().splitlines()) == 1


def test_cli_trains_alibi_gaussian_and_records_epsilon_delta(data_dir, tmp_path):
    out = tmp_path / "g"
    argv = [
        "train",
        "--dataset",
        "fashion-mnist",
        "--method",
        "alibi",
        "--epsilon",
        "2",
        "--alibi-noise",
        "gaussian",
        "--delta",
        "1e-5",
        "--epochs",
        "1",
        "--batch-size",
        "50",
        "--data-dir",
        str(data_dir),
        "--out",
        str(out),
        "--quiet",
    ]
    assert cli.main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epsilon"] == 2.0 and metrics["delta"] == 1e-5
    assert (
        json.loads((out / "config.json").read_text())["run"]["method_options"]["noise"]
        == "gaussian"
    )
