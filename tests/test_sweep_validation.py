"""Sweep files are checked before any run (misspelt method-option tables, wrong types, an
empty grid); `report`/`plot` never create a store; every run records the settings that
change its floating-point results, and a sweep refuses to mix them unless told to."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
import torch

from labeldp import cli
from labeldp.errors import ConfigError
from labeldp.runner import Environment
from labeldp.store import SCHEMA_VERSION, ResultsStore
from labeldp.sweep import SweepSpec, run_sweep

BASE = """
name = "val"
dataset = "fashion-mnist"
methods = ["rr", "dp-sgd"]
epsilons = [1, 4]
seeds = [0]
crop_padding = 0

[train]
epochs = 1
batch_size = 50
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "val.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        # a misspelt table used to be dropped: every dp-sgd run used C = 1, δ = 1e-5
        (BASE + "[method_options.dp_sgd]\nmax_grad_norm = 0.1\n", "[method_options.dp_sgd]"),
        # a missing [train] epochs used to hide every other error (and named TrainConfig)
        (
            BASE.replace('"dp-sgd"]', '"dp_sgd"]').replace("epochs = 1\n", ""),
            "no such method dp_sgd",
        ),
        (
            BASE.replace("epochs = 1\n", "").replace("seeds = [0]", "seeds = [0]\nrecipes = false"),
            "[train] must set epochs",
        ),
        (BASE + "[method_options.alibi]\nnoise = 'gaussian'\n", "[method_options.alibi] names no"),
        (BASE + "[method_options.rr]\nsecure_noyse = true\n", "does not take secure_noyse"),
        (BASE + "[method_options.rr]\nepsilon = 2\n", "cannot set epsilon"),
        (BASE + "[method_options]\nrr = 3\n", "method_options.rr must be a table"),
        (BASE.replace("epsilons = [1, 4]", 'epsilons = ["one", 2]'), "epsilons must be a list"),
        (BASE.replace('name = "val"', "name = 7"), "name must be a non-empty string, got 7"),
        (BASE.replace('name = "val"', 'name = "a/b"'), "name must be a name without '/'"),
        (BASE.replace("seeds = [0]", "seeds = [0.5]"), "seeds must be a list of integers"),
        (BASE.replace("seeds = [0]", 'seeds = "0"'), "seeds must be a list of integers"),
        (BASE.replace('["rr", "dp-sgd"]', '"rr"'), "methods must be a list of method names"),
        ("include_nonprivate = 1\n" + BASE, "include_nonprivate must be true or false"),
        (BASE + "[per_method.rr]\nepsilons = [true]\n", "per_method.rr.epsilons must be a list"),
        ('hflip = "no"\n' + BASE, "hflip must be true or false, got 'no'"),
        (BASE + "[per_method.rr]\ncrop_padding = '1'\n", "per_method.rr.crop_padding must be"),
        # an empty grid used to "run" 0 runs and exit 0
        (
            "include_nonprivate = false\n" + BASE.replace('["rr", "dp-sgd"]', "[]"),
            "the grid is empty",
        ),
        (BASE.replace("seeds = [0]", "seeds = []"), "the grid is empty"),
        (BASE.replace("[1, 4]", "[]"), "method rr has an empty ε grid"),
    ],
)
def test_sweep_file_mistakes_are_errors_that_name_the_key(tmp_path, text, fragment):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        SweepSpec.load(path)
    assert fragment in str(info.value) and str(path) in str(info.value)


def test_a_sweep_file_mistake_is_one_line_with_status_2(tmp_path, capsys):
    path = _write(tmp_path, BASE + "[method_options.dp_sgd]\nmax_grad_norm = 0.1\n")
    store = tmp_path / "store.sqlite"
    assert cli.main(["sweep", str(path), "--store", str(store), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "[method_options.dp_sgd] names no method" in err[0]
    assert not store.exists()


def test_correct_method_options_reach_the_runs(tmp_path):
    spec = SweepSpec.load(_write(tmp_path, BASE + "[method_options.dp-sgd]\nmax_grad_norm = 0.1\n"))
    runs = dict(spec.runs())
    assert runs["dp-sgd-eps4-seed0"].method_options == {"max_grad_norm": 0.1, "epsilon": 4.0}


@pytest.mark.parametrize("command", ["report", "plot"])
def test_report_and_plot_of_a_never_run_sweep_fail_and_create_no_store(tmp_path, capsys, command):
    path = _write(tmp_path, BASE)
    store = tmp_path / "missing" / "runs.sqlite"
    outputs = ["--results-dir", str(tmp_path / "res"), "--figures-dir", str(tmp_path / "figs")]
    assert cli.main([command, str(path), "--store", str(store), *outputs]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist; run labeldp sweep first" in err[0]
    assert not (tmp_path / "missing").exists()
    assert not (tmp_path / "res").exists() and not (tmp_path / "figs").exists()
    ResultsStore(tmp_path / "empty.sqlite")  # a store without runs of this sweep
    argv = [command, str(path), "--store", str(tmp_path / "empty.sqlite"), *outputs]
    assert cli.main(argv) == 2
    assert "holds no runs of sweep val" in capsys.readouterr().err
    assert not (tmp_path / "res").exists()


# --- numerics ---------------------------------------------------------------------------

TINY = """
name = "num"
dataset = "fashion-mnist"
methods = ["rr"]
epsilons = [1, 2, 4]
seeds = [0]
include_nonprivate = false
crop_padding = 0

[train]
epochs = 1
batch_size = 50
"""


pytestmark = pytest.mark.fake_fashion(n_train=200, n_test=50)


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def test_a_sweep_refuses_to_mix_runs_made_under_other_thread_counts(
    data_dir, tmp_path, threads, capsys
):
    spec = SweepSpec.load(_write(tmp_path, TINY))
    store = ResultsStore(tmp_path / "runs.sqlite")
    env = Environment(data_dir=str(data_dir), progress=False)
    runs = tmp_path / "runs"
    threads(1)
    assert run_sweep(spec, store, runs, env, only="rr-eps1-*") == 1
    (row,) = store.rows("num")
    recorded = json.loads(row["numerics"])
    assert recorded["threads"] == 1 and recorded["torch"] == torch.__version__
    assert recorded["device"] == "cpu"
    metrics = json.loads((runs / "num" / "rr-eps1-seed0" / "metrics.json").read_text())
    assert metrics["numerics"] == recorded

    threads(2)  # as another --workers count would give
    with pytest.raises(ConfigError) as info:
        run_sweep(spec, store, runs, env, only="rr-eps2-*")
    message = str(info.value)
    assert "1 threads" in message and "2 threads" in message
    assert "--allow-mixed-numerics" in message
    assert len(store.rows("num")) == 1 and not (runs / "num" / "rr-eps2-seed0").exists()
    assert run_sweep(spec, store, runs, env, only="rr-eps2-*", allow_mixed_numerics=True) == 1

    # Rows stored before numerics were recorded count as unknown: a warning, no refusal.
    with sqlite3.connect(store.path) as db:
        db.execute("UPDATE runs SET numerics = NULL")
    capsys.readouterr()
    threads(1)
    assert run_sweep(spec, store, runs, env, only="rr-eps4-*") == 1
    assert "2 stored runs recorded no numerics settings" in capsys.readouterr().err


def test_the_cli_flag_allows_mixed_numerics(data_dir, tmp_path, threads, capsys):
    path = _write(tmp_path, TINY)
    argv = ["sweep", str(path), "--store", str(tmp_path / "s.sqlite"), "--runs-dir",
            str(tmp_path / "runs"), "--data-dir", str(data_dir), "--quiet"]  # fmt: skip
    threads(1)
    assert cli.main([*argv, "--only", "rr-eps1-*"]) == 0
    threads(2)
    assert cli.main([*argv, "--only", "rr-eps2-*"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "other numerics" in err[0]
    assert cli.main([*argv, "--only", "rr-eps2-*", "--allow-mixed-numerics"]) == 0


def test_a_version_1_store_gains_the_numerics_column(tmp_path):
    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE runs (id INTEGER PRIMARY KEY, sweep TEXT NOT NULL, key TEXT NOT NULL, "
        "name TEXT NOT NULL, method TEXT NOT NULL, epsilon REAL, seed INTEGER NOT NULL, "
        "test_accuracy REAL NOT NULL, eps_lb_memorization REAL, eps_lb_one_run REAL, "
        "label_inference_gap REAL, train_seconds REAL, run_dir TEXT NOT NULL, "
        "config TEXT NOT NULL, metrics TEXT NOT NULL, attack TEXT, git_commit TEXT, "
        "machine TEXT, finished_at TEXT NOT NULL, UNIQUE (sweep, key));"
    )
    settings = {"torch": "2.0", "threads": 4, "device": "cpu"}
    for key, metrics in (
        ("a", {"diagnostics": {}}),
        ("b", {"diagnostics": {}, "numerics": settings}),
    ):
        db.execute(
            "INSERT INTO runs (sweep, key, name, method, seed, test_accuracy, run_dir, config, "
            "metrics, finished_at) VALUES ('s', ?, 'n', 'rr', 0, 0.5, 'r', '{}', ?, 'now')",
            (key, json.dumps(metrics)),
        )
    db.execute("PRAGMA user_version = 1")
    db.commit()
    db.close()
    rows = ResultsStore(path).rows("s")
    assert [r["numerics"] for r in rows] == [None, json.dumps(settings, sort_keys=True)]
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2
    assert ResultsStore(path).rows("s") == rows  # a second open changes nothing
