"""Sweeps, the results store, reports and figures, on tiny generated data; a sweep killed
with SIGKILL and rerun loses and duplicates nothing."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fakes import isolate_data_sources, write_learnable_fashion

from labeldp import cli
from labeldp.errors import ConfigError
from labeldp.runner import Environment
from labeldp.store import ResultsStore
from labeldp.sweep import SweepSpec, run_sweep

TINY = """
name = "tiny"
dataset = "fashion-mnist"
methods = ["rr", "alibi"]
epsilons = [1, 4]
seeds = [0, 1]
canaries = 20
audit_canaries = 20
crop_padding = 0

[train]
epochs = {epochs}
batch_size = 50
"""


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    isolate_data_sources(monkeypatch, tmp_path)
    return write_learnable_fashion(tmp_path / "data", n_train=300, n_test=100)


def _sweep_file(tmp_path: Path, epochs: int = 1, text: str = TINY) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(text.format(epochs=epochs))
    return path


def test_only_runs_the_matching_grid_points(data_dir, tmp_path):
    spec = SweepSpec.load(_sweep_file(tmp_path))
    store = ResultsStore(tmp_path / "runs.sqlite")
    env = Environment(data_dir=str(data_dir), progress=False)
    assert run_sweep(spec, store, tmp_path / "runs", env, only="rr-*-seed1") == 2
    assert sorted(r["name"] for r in store.rows("tiny")) == ["rr-eps1-seed1", "rr-eps4-seed1"]
    with pytest.raises(ConfigError, match="only: 'dp-sgd-\\*' matches no run of tiny"):
        run_sweep(spec, store, tmp_path / "runs", env, only="dp-sgd-*")
    from labeldp.report import write_report

    md, _ = write_report(store, spec, "tiny.toml", tmp_path / "results")
    assert "(1 of 2 seeds)" in md.read_text()  # a partial row says so


def test_sweep_runs_the_grid_once_and_reports_it(data_dir, tmp_path):
    spec = SweepSpec.load(_sweep_file(tmp_path))
    assert len(spec.runs()) == 2 * (1 + 2 * 2)
    store = ResultsStore(tmp_path / "runs.sqlite")
    env = Environment(data_dir=str(data_dir), progress=False)
    assert run_sweep(spec, store, tmp_path / "runs", env) == 10
    assert run_sweep(spec, store, tmp_path / "runs", env) == 0  # everything finished
    rows = store.rows("tiny")
    assert len(rows) == 10 and len({r["key"] for r in rows}) == 10
    assert all(r["eps_lb_memorization"] is not None for r in rows)
    assert {r["epsilon"] for r in rows} == {None, 1.0, 4.0}

    # Rows of an earlier version of the sweep file are kept but not reported.
    edited = SweepSpec.load(_sweep_file(tmp_path, text=TINY.replace("[1, 4]", "[4]")))
    from labeldp.report import summary

    assert set(summary(store, edited)["epsilon"].dropna()) == {4.0}
    _sweep_file(tmp_path)  # restore the file for the CLI below

    results, figures = tmp_path / "results", tmp_path / "figs"
    common = [
        "--store",
        str(tmp_path / "runs.sqlite"),
        "--results-dir",
        str(results),
        "--figures-dir",
        str(figures),
        str(tmp_path / "tiny.toml"),
    ]
    assert cli.main(["report", *common]) == 0
    assert cli.main(["plot", *common]) == 0
    text = (results / "tiny.md").read_text()
    assert "| rr |" in text and "±" in text and "ε_LB memorization" in text and "commits" in text
    csv = (results / "tiny.csv").read_text().splitlines()
    assert csv[0].startswith("method,epsilon,accuracy_mean,accuracy_std,seeds") and len(csv) == 6
    for kind in ("utility", "audit"):
        for suffix in ("png", "pdf"):
            assert (figures / f"tiny_{kind}.{suffix}").stat().st_size > 1000


def test_sweep_files_are_validated_with_the_file_and_key_named(tmp_path):
    bad = {
        "unknown keys colour": 'colour = "red"\n' + TINY,
        "missing keys epsilons": TINY.replace("epsilons = [1, 4]", ""),
        "bad [train] option": TINY.replace("batch_size = 50", "batch_size = 50\nmomentumm = 0.9"),
        "put seeds in 'seeds'": TINY.replace("batch_size = 50", "batch_size = 50\nseed = 3"),
        "epsilon must be a finite number > 0": TINY.replace("[1, 4]", "[0, 4]"),
        "method must be one of": TINY.replace('"alibi"]', '"magic"]'),
        "[per_method.lp-2st] names no method": TINY + "[per_method.lp-2st]\nnorm = 'group'\n",
        "[per_method.rr] cannot set colour": TINY + "[per_method.rr]\ncolour = 1\n",
    }
    for fragment, text in bad.items():
        path = _sweep_file(tmp_path, text=text)
        with pytest.raises(ConfigError) as info:
            SweepSpec.load(path)
        assert fragment in str(info.value) and str(path) in str(info.value)
    with pytest.raises(ConfigError, match="does not exist"):
        SweepSpec.load(tmp_path / "nope.toml")


def test_per_method_settings_replace_the_shared_ones_for_that_method_only(tmp_path):
    text = TINY + '[per_method.rr]\nnorm = "group"\n[per_method.rr.train]\nbatch_size = 30\n'
    runs = dict(SweepSpec.load(_sweep_file(tmp_path, text=text)).runs())
    rr, alibi = runs["rr-eps1-seed1"], runs["alibi-eps1-seed1"]
    assert (rr.norm, rr.train.batch_size, rr.train.seed) == ("group", 30, 1)
    assert (alibi.norm, alibi.train.batch_size) == ("batch", 50)
    assert rr.crop_padding == alibi.crop_padding == 0


def test_reproduce_runs_a_profile_end_to_end(data_dir, tmp_path, monkeypatch):
    """`labeldp reproduce` (what `make reproduce` calls): sweep, report and figures."""
    experiments = tmp_path / "experiments"
    experiments.mkdir()
    (experiments / "tiny.toml").write_text(TINY.format(epochs=1))
    monkeypatch.setattr(cli, "EXPERIMENTS", experiments)
    monkeypatch.setattr(cli, "PROFILES", {"quick": ("tiny.toml",)})
    results, figures = tmp_path / "results", tmp_path / "figs"
    argv = [
        "reproduce", "--store", str(tmp_path / "runs.sqlite"), "--runs-dir",
        str(tmp_path / "runs"), "--results-dir", str(results), "--figures-dir", str(figures),
        "--data-dir", str(data_dir), "--quiet",
    ]  # fmt: skip
    assert cli.main(argv) == 0
    assert (results / "tiny.md").exists() and (figures / "tiny_utility.png").exists()
    assert len(ResultsStore(tmp_path / "runs.sqlite").rows("tiny")) == 10


def test_a_method_may_have_its_own_epsilon_grid(tmp_path):
    text = TINY + "[per_method.alibi]\nepsilons = [0.25]\n"
    spec = SweepSpec.load(_sweep_file(tmp_path, text=text))
    names = {n for n, _ in spec.runs()}
    assert {"alibi-eps0.25-seed0", "rr-eps1-seed0", "rr-eps4-seed0"} <= names
    assert not {"alibi-eps1-seed0", "rr-eps0.25-seed0"} & names
    assert dict(spec.runs())["alibi-eps0.25-seed0"].method_options["epsilon"] == 0.25


def test_the_shipped_sweep_files_are_valid():
    experiments = Path(__file__).resolve().parent.parent / "experiments"
    names = {SweepSpec.load(p).name for p in experiments.glob("*.toml")}
    assert {"fashion_mnist_quick", "fashion_mnist_full", "cifar10_paper", "cifar100_paper"} <= names


def _rows(db: Path) -> list[tuple]:
    if not db.exists():
        return []
    try:
        with sqlite3.connect(db) as conn:
            return conn.execute("SELECT id, key, finished_at FROM runs ORDER BY id").fetchall()
    except sqlite3.OperationalError:  # the table is not created yet
        return []


def test_a_sweep_killed_with_sigkill_resumes_without_loss_or_duplicates(data_dir, tmp_path):
    sweep_file = _sweep_file(tmp_path, epochs=12)
    db, runs = tmp_path / "runs.sqlite", tmp_path / "runs"
    argv = [
        "sweep",
        str(sweep_file),
        "--store",
        str(db),
        "--runs-dir",
        str(runs),
        "--data-dir",
        str(data_dir),
        "--quiet",
    ]
    code = f"import sys; from labeldp.cli import main; sys.exit(main({argv!r}))"
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    env.pop("LABELDP_DATA", None)
    process = subprocess.Popen(
        [sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 240
    while len(_rows(db)) < 2 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    before = _rows(db)
    assert 2 <= len(before) < 10, "the sweep should have been killed part-way"
    finished = {
        name: (runs / "tiny" / name / "metrics.json").stat().st_mtime_ns
        for name in os.listdir(runs / "tiny")
        if (runs / "tiny" / name / "metrics.json").exists()
    }

    assert cli.main(argv) == 0
    after = _rows(db)
    assert len(after) == 10 and len({key for _, key, _ in after}) == 10  # nothing lost or twice
    assert after[: len(before)] == before  # finished rows untouched
    for name, mtime in finished.items():  # finished runs were not redone
        assert (runs / "tiny" / name / "metrics.json").stat().st_mtime_ns == mtime


def test_a_sweep_with_two_workers_stores_every_run_once(data_dir, tmp_path):
    spec = SweepSpec.load(_sweep_file(tmp_path, text=TINY.replace("seeds = [0, 1]", "seeds = [0]")))
    store = ResultsStore(tmp_path / "runs.sqlite")
    env = Environment(data_dir=str(data_dir), progress=False)
    assert run_sweep(spec, store, tmp_path / "runs", env, workers=2) == 5
    rows = store.rows("tiny")
    assert sorted(r["name"] for r in rows) == sorted(name for name, _ in spec.runs())
