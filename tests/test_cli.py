"""The command line as a user meets it: runs on small generated data, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fakes import isolate_data_sources

from labeldp import cli
from labeldp.data import random_subset


def _train(data_dir: Path, out: Path, *extra: str) -> int:
    return cli.main(
        [
            "train",
            "--dataset",
            "fashion-mnist",
            "--epochs",
            "2",
            "--batch-size",
            "50",
            "--data-dir",
            str(data_dir),
            "--out",
            str(out),
            "--quiet",
            "--no-download",
            *extra,
        ]
    )


def test_train_writes_config_metrics_and_model(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(data_dir, out, "--epochs", "5", "--crop-padding", "0") == 0
    metrics = json.loads((out / "metrics.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert 0.5 <= metrics["test_accuracy"] <= 1.0  # chance is 0.1; the bars are easy
    assert metrics["epsilon"] == "Infinity" and metrics["delta"] is None  # labeldp.records
    assert metrics["ledger"]["entries"] == []
    assert metrics["train_seconds"] > 0 and metrics["device"] == "cpu"
    assert metrics["labeldp_version"] and "git_commit" in metrics
    assert len(metrics["history"]) == 5 and metrics["train_size"] == 400
    assert config["run"]["dataset"] == "fashion-mnist" and config["run"]["model"] == "cnn"
    assert config["run"]["train"]["epochs"] == 5
    assert (out / "model.pt").exists() and not list(out.glob("*.ckpt"))
    assert "test accuracy" in capsys.readouterr().out


def test_a_finished_run_is_never_overwritten(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(data_dir, out, "--epochs", "1") == 0
    before = (out / "metrics.json").read_text()
    assert _train(data_dir, out, "--epochs", "1") == 2
    assert "already holds a finished run" in capsys.readouterr().err
    assert _train(data_dir, out, "--epochs", "1", "--resume") == 0  # reports, no retraining
    assert (out / "metrics.json").read_text() == before
    assert _train(data_dir, out, "--epochs", "1", "--lr", "0.01", "--resume") == 2
    assert "other options" in capsys.readouterr().err


def test_interrupted_run_resumes_to_the_same_result(data_dir, tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    assert _train(data_dir, straight, "--epochs", "3") == 0

    from labeldp.train import loop

    original = loop.Trainer._train_epoch

    def interrupt_in_third_epoch(self, epoch):
        if epoch == 2:
            raise KeyboardInterrupt
        return original(self, epoch)

    out = tmp_path / "interrupted"
    monkeypatch.setattr(loop.Trainer, "_train_epoch", interrupt_in_third_epoch)
    assert _train(data_dir, out, "--epochs", "3") == 130
    assert not (out / "metrics.json").exists() and (out / "train.ckpt").exists()
    assert _train(data_dir, out, "--epochs", "3") == 2  # unfinished: needs --resume
    monkeypatch.setattr(loop.Trainer, "_train_epoch", original)
    assert _train(data_dir, out, "--epochs", "3", "--resume") == 0
    a = json.loads((straight / "metrics.json").read_text())
    b = json.loads((out / "metrics.json").read_text())
    assert b["resumed_from_epoch"] == 2
    assert a["test_accuracy"] == b["test_accuracy"]
    assert [h["train_loss"] for h in a["history"]] == [h["train_loss"] for h in b["history"]]


def test_train_size_uses_a_seeded_label_independent_subset(data_dir, tmp_path):
    out = tmp_path / "sub"
    assert _train(data_dir, out, "--train-size", "100", "--epochs", "1") == 0
    assert json.loads((out / "metrics.json").read_text())["train_size"] == 100
    assert random_subset(400, 100, 7).tolist() == random_subset(400, 100, 7).tolist()


FM = ["--dataset", "fashion-mnist"]


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["--dataset", "imagenet"], "--dataset: invalid choice"),
        ([*FM, "--method", "magic"], "--method: invalid choice"),
        ([*FM, "--epochs", "0"], "--epochs: must be an integer ≥ 1"),
        ([*FM, "--epochs", "two"], "--epochs: must be an integer ≥ 1"),
        ([*FM, "--lr", "-1"], "--lr: must be a number > 0"),
        ([*FM, "--lr", "nan"], "--lr: must be a number > 0"),
        ([*FM, "--momentum", "1.5"], "--momentum: must be a number in [0, 1)"),
        ([*FM, "--train-size", "0"], "--train-size: must be an integer ≥ 1"),
        ([*FM, "--model", "vgg"], "unknown model name 'vgg'"),
        ([*FM, "--train-size", "401"], "train_size must be in 1..400"),
        ([*FM, "--device", "cuda:7"], "CUDA is not available"),
        ([*FM, "--ema", "1"], "--ema: must be a number in (0, 1)"),
    ],
)
def test_invalid_options_exit_2_with_one_line(args, fragment, data_dir, tmp_path, capsys):
    argv = ["train", *args, "--data-dir", str(data_dir), "--out", str(tmp_path / "x"), "--quiet"]
    try:
        code = cli.main(argv)
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2
    assert fragment in err
    assert len(err.strip().splitlines()) == 1, err


def test_missing_data_is_one_clear_line_exit_1(tmp_path, monkeypatch, capsys):
    isolate_data_sources(monkeypatch, tmp_path)
    code = cli.main(
        ["train", "--dataset", "mnist", "--out", str(tmp_path / "x"), "--no-download", "--quiet"]
    )
    err = capsys.readouterr().err
    assert code == 1 and "labeldp data fetch mnist" in err and "train-images" in err
    assert len(err.strip().splitlines()) == 1, err


def test_help_documents_every_train_option(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    parser = cli.build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]
    for action in train._actions:
        assert action.help, f"{action.option_strings} has no help"
        for option in action.option_strings:
            assert option in text
