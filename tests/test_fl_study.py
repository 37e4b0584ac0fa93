"""Federated sweeps end to end (labeldp sweep / report / plot on a federated file), the
`labeldp fl` command, the federation options' docs, and time-to-target."""

from __future__ import annotations

import json
import math
import sqlite3
from pathlib import Path

import pytest
from fakes import isolate_data_sources, write_learnable_fashion

from labeldp.cli import main
from labeldp.errors import ConfigError
from labeldp.fl.options import FederationOptions, options_markdown
from labeldp.fl.run import time_to_target
from labeldp.fl.study import FederatedSweep

ROOT = Path(__file__).resolve().parents[1]

SWEEP = """
name = "fl_tiny"
kind = "federation"
description = "two algorithms on a tiny federation"
dataset = "fashion-mnist"
seeds = [0, 1]
target_accuracy = 0.3
[options]
layout = "dirichlet"
clients = 40
alpha = 1.0
concurrency = 8
server_steps = 6
eval_every = 2
local_batch = 8
local_lr = 0.1
label_privacy = "rr"
[grid]
algorithm = ["fedavg", "fedbuff"]
epsilon = [2.0, inf]
[when.fedavg]
server_steps = 3
[when.fedbuff]
buffer_size = 4
"""


@pytest.fixture
def data(tmp_path, monkeypatch):
    isolate_data_sources(monkeypatch, tmp_path)
    return write_learnable_fashion(tmp_path / "data", n_train=400, n_test=100)


def test_a_federated_sweep_runs_resumes_reports_and_plots(tmp_path, data, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "fl_tiny.toml"
    path.write_text(SWEEP)
    common = ["--store", "store.sqlite", "--runs-dir", "runs"]
    args = ["sweep", str(path), *common, "--data-dir", str(data), "--quiet"]
    assert main(args) == 0
    db = sqlite3.connect("store.sqlite")
    rows = db.execute("SELECT name, algorithm, label_epsilon FROM federated_runs").fetchall()
    assert len(rows) == 8
    assert {r[1] for r in rows} == {"fedavg", "fedbuff"}
    assert {r[2] for r in rows} == {2.0, None}  # ε = inf stored as NULL: no label DP
    assert main(args) == 0  # nothing left to run
    assert db.execute("SELECT COUNT(*) FROM federated_runs").fetchone()[0] == 8
    assert main(["report", str(path), *common[:2], "--results-dir", "results"]) == 0
    text = Path("results/fl_tiny.md").read_text()
    assert "fedbuff-epsilon2-seed" not in text and "| fedbuff-epsilon2 | 2 |" in text
    assert "÷ fedbuff" in text
    assert main(["plot", str(path), *common[:2], "--figures-dir", "figs"]) == 0
    assert Path("figs/fl_tiny_accuracy.png").stat().st_size > 0
    assert Path("figs/fl_tiny_staleness.pdf").stat().st_size > 0


def test_bad_federated_sweeps_are_refused(tmp_path):
    path = tmp_path / "bad.toml"
    for text, match in (
        (SWEEP.replace("alpha = 1.0", "alfa = 1.0"), "unknown options alfa"),
        (SWEEP.replace("seeds = [0, 1]", "seeds = []"), "seeds"),
        (SWEEP.replace("buffer_size = 4", "buffer_size = 40"), "buffer_size"),
        (SWEEP.replace("[when.fedbuff]\nbuffer", "[when.fedbuff]\nbuffers"), "unknown options"),
        (SWEEP.replace("target_accuracy = 0.3", 'target_accuracy = 0.3\nbaseline = "no.toml"'),
         "baseline 'no.toml' is not a sweep file next to it"),
    ):  # fmt: skip
        path.write_text(text)
        with pytest.raises(ConfigError, match=match):
            FederatedSweep.load(path)


def test_labeldp_fl_runs_one_federation(tmp_path, data, capsys):
    out = tmp_path / "run"
    args = ["fl", "--out", str(out), "--data-dir", str(data), "--quiet", "--clients", "20",
            "--concurrency", "5", "--buffer-size", "5", "--server-steps", "4",
            "--label-privacy", "rr-prior", "--epsilon", "1"]  # fmt: skip
    assert main(args) == 0
    record = json.loads((out / "metrics.json").read_text())
    assert record["label_ledger"]["relation"] == "replace one label"
    assert len(record["history"]) == 1  # evaluated after the last step
    assert "fedbuff: test accuracy" in capsys.readouterr().out
    assert main(args) == 0  # finished: read back, not rerun
    assert main([*args[:-1], "2"]) == 2  # another configuration in the same folder
    assert "another configuration" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["fl", "--out", str(tmp_path / "x"), "--local-lr", "-1"])
    assert exit_.value.code == 2
    assert "--local-lr: must be a number > 0" in capsys.readouterr().err


def test_a_validation_split_is_carved_for_tuning(tmp_path, data, capsys, monkeypatch):
    import labeldp.fl.run as fl_run

    seen = {}
    real = fl_run.run_federation

    def spy(config, train, test, population, *args, **kwargs):
        seen.update(train=len(train), test=len(test), dealt=population.num_examples)
        return real(config, train, test, population, *args, **kwargs)

    monkeypatch.setattr(fl_run, "run_federation", spy)
    out = tmp_path / "tune"
    args = ["fl", "--out", str(out), "--data-dir", str(data), "--quiet", "--clients", "20",
            "--concurrency", "5", "--buffer-size", "5", "--server-steps", "2", "--validation-size",
            "150"]  # fmt: skip
    assert main(args) == 0
    # the clients hold the other 250 training examples; the model is scored on the 150
    assert seen == {"train": 250, "test": 150, "dealt": 250}
    record = json.loads((out / "metrics.json").read_text())
    assert record["evaluation_split"] == "validation"
    assert "fedbuff: validation accuracy" in capsys.readouterr().out
    bad = ["fl", "--out", str(tmp_path / "bad"), "--data-dir", str(data), "--quiet",
           "--validation-size", "400"]  # fmt: skip
    assert main(bad) == 2
    assert "validation_size must be in 1..399" in capsys.readouterr().err


def test_federation_options_docs_are_generated():
    committed = (ROOT / "docs" / "FL_OPTIONS.md").read_text()
    assert committed == options_markdown(), (
        "regenerate: python -m labeldp.fl.options > docs/FL_OPTIONS.md"
    )


def test_presets_fill_what_is_unset():
    assert FederationOptions(algorithm="fedasync").config(0).schedule.buffer_size == 1
    assert FederationOptions(algorithm="fedbuff").config(0).schedule.buffer_size == 10
    avgm = FederationOptions(algorithm="fedavgm", concurrency=50).config(0)
    assert avgm.schedule.mode == "sync" and avgm.server.momentum == 0.9
    assert avgm.schedule.aggregation_size == 50
    with pytest.raises(ConfigError, match="needs epsilon"):
        FederationOptions(label_privacy="rr")


def test_time_to_target_interpolates_the_best_so_far_curve():
    history = [
        {"virtual_time": 1.0, "accuracy": 0.2},
        {"virtual_time": 2.0, "accuracy": 0.6},
        {"virtual_time": 3.0, "accuracy": 0.4},  # a dip: the best so far stays 0.6
        {"virtual_time": 4.0, "accuracy": 0.9},
    ]
    assert time_to_target(history, 0.4) == pytest.approx(1.5)
    assert time_to_target(history, 0.75) == pytest.approx(3.5)  # from (3, 0.6) to (4, 0.9)
    assert time_to_target(history, 0.1) == 1.0
    assert math.isinf(time_to_target(history, 0.95))


def test_the_price_of_federation_sets_the_centralized_accuracy_beside_each_variant(
    tmp_path, monkeypatch
):
    import pandas as pd

    import labeldp.report
    from labeldp.fl.report import baseline_table

    (tmp_path / "central.toml").write_text(
        'name = "central"\ndataset = "fashion-mnist"\nmethods = ["rr"]\nepsilons = [2]\n'
        "seeds = [0]\n"
    )
    path = tmp_path / "fl_tiny.toml"
    baseline = 'target_accuracy = 0.3\nbaseline = "central.toml"'
    path.write_text(SWEEP.replace("target_accuracy = 0.3", baseline))
    spec = FederatedSweep.load(path)
    central = pd.DataFrame(
        {"epsilon": [2.0, math.nan], "accuracy_mean": [0.8, 0.9], "accuracy_std": [0.01, 0.02]}
    )
    monkeypatch.setattr(labeldp.report, "summary", lambda store, sweep: central)
    frame = pd.DataFrame({
        "variant": ["fedbuff-epsilon2", "fedbuff-epsilon2", "fedbuff-epsiloninf"],
        "label_epsilon": [2.0, 2.0, math.inf], "final_accuracy": [0.6, 0.7, 0.75],
    })  # fmt: skip
    lines = baseline_table(None, spec, frame)
    assert lines[2] == "| fedbuff-epsilon2 | 2 | 65.00 ± 7.07 | 80.00 ± 1.00 | +15.00 |"
    assert lines[3] == "| fedbuff-epsiloninf | ∞ | 75.00 | 90.00 ± 2.00 | +15.00 |"
    duplicated = pd.concat([central, central.iloc[:1]])
    monkeypatch.setattr(labeldp.report, "summary", lambda store, sweep: duplicated)
    with pytest.raises(ConfigError, match="one per ε"):
        baseline_table(None, spec, frame)
