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

import pandas as pd
import pytest
from fakes import attack_record, finished_runs, run_record

from labeldp import cli
from labeldp import experiments as packaged
from labeldp.backends import LocalBackend
from labeldp.errors import ConfigError
from labeldp.fl.study import FederatedSweep, is_federated
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


pytestmark = pytest.mark.fake_fashion(n_train=300, n_test=100)


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
    assert csv[0].startswith("method,variant,epsilon,accuracy_mean,accuracy_std,seeds")
    assert len(csv) == 6
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
    monkeypatch.setattr(packaged, "folder", lambda: experiments)
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


def test_reproduce_only_runs_the_matching_points_and_skips_a_sweep_without_any(
    data_dir, tmp_path, monkeypatch, capsys
):
    """`labeldp reproduce --only PATTERN`: the pattern applies to every sweep of the
    profile; a sweep with no matching point is skipped with a note, not an error; a
    pattern that matches no sweep at all is."""
    experiments = tmp_path / "experiments"
    experiments.mkdir()
    small = TINY.format(epochs=1).replace("seeds = [0, 1]", "seeds = [0]").replace("[1, 4]", "[1]")
    (experiments / "tiny.toml").write_text(small)
    (experiments / "aud.toml").write_text(
        small.replace('"tiny"', '"aud"').replace('["rr", "alibi"]', '["rr"]')
    )
    monkeypatch.setattr(packaged, "folder", lambda: experiments)
    monkeypatch.setattr(cli, "PROFILES", {"quick": ("tiny.toml", "aud.toml")})
    results, figures = tmp_path / "results", tmp_path / "figs"
    argv = [
        "reproduce", "--store", str(tmp_path / "runs.sqlite"), "--runs-dir",
        str(tmp_path / "runs"), "--results-dir", str(results), "--figures-dir", str(figures),
        "--data-dir", str(data_dir), "--quiet", "--only",
    ]  # fmt: skip
    assert cli.main([*argv, "alibi-*"]) == 0
    store = ResultsStore(tmp_path / "runs.sqlite")
    assert [r["name"] for r in store.rows("tiny")] == ["alibi-eps1-seed0"]
    assert store.rows("aud") == [] and not (results / "aud.md").exists()
    assert "runs: 1 of 3 in the grid" in (results / "tiny.md").read_text()
    assert (figures / "tiny_utility.png").exists()
    assert "--only 'alibi-*' matches no run of sweep aud (aud); skipped" in capsys.readouterr().err
    assert cli.main([*argv, "nothing-*"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("labeldp reproduce: error: --only 'nothing-*' matches no run of any")


def test_a_method_may_have_its_own_epsilon_grid(tmp_path):
    text = TINY + "[per_method.alibi]\nepsilons = [0.25]\n"
    spec = SweepSpec.load(_sweep_file(tmp_path, text=text))
    names = {n for n, _ in spec.runs()}
    assert {"alibi-eps0.25-seed0", "rr-eps1-seed0", "rr-eps4-seed0"} <= names
    assert not {"alibi-eps1-seed0", "rr-eps0.25-seed0"} & names
    assert dict(spec.runs())["alibi-eps0.25-seed0"].method_options["epsilon"] == 0.25


def test_the_shipped_sweep_files_are_valid():
    paths = [packaged.find(n) for n in packaged.names()]
    names = {SweepSpec.load(p).name for p in paths if not is_federated(p)}
    assert {"fashion_mnist_quick", "fashion_mnist_full", "cifar10_paper", "cifar100_paper"} <= names
    federated = {FederatedSweep.load(p).name for p in paths if is_federated(p)}
    assert {"fl_algorithms", "fl_concurrency", "fl_robustness", "fl_label_dp"} <= federated


#: The [train] and method options shared by the audited sweeps below (tiny PATE).
DPSGD_PATE_OPTIONS = """
[train]
epochs = 1

[method_options.dp-sgd]
delta = 1e-5

[method_options.pate-fm]
delta = 1e-5
teachers = 5
queries = 10
threshold = 3
sigma1 = 2
sigma2 = 1
"""

AUDITED = (
    """
name = "facts"
dataset = "fashion-mnist"
methods = ["rr", "dp-sgd", "pate-fm"]
epsilons = [1, 4]
seeds = [0, 1]
canaries = 20
audit_canaries = 20
"""
    + DPSGD_PATE_OPTIONS
)


def _fake_audited_store(tmp_path: Path) -> tuple[SweepSpec, ResultsStore]:
    """A store holding every grid point of AUDITED without training: attack.json made
    before it recorded its caps, one violation (rr, ε = 1, seed 1), and pate-fm's seed 0
    made before its ledger recorded the stopping rule."""
    path = tmp_path / "facts.toml"
    path.write_text(AUDITED)
    spec, store = SweepSpec.load(path), ResultsStore(tmp_path / "runs.sqlite")
    for name, config in spec.runs():
        eps, seed = config.method_options.get("epsilon"), config.train.seed
        details = {"stopping_rule": "data-independent"} if seed == 1 else {}
        metrics = run_record(
            method=config.method,
            epsilon=eps,
            delta=None if eps is None else config.method_options.get("delta", 0.0),
            test_accuracy=0.5,
            train_seconds=1.0,
            ledger={"entries": [] if eps is None else [{"details": details}]},
        )
        lb = 1.04 if (config.method, eps, seed) == ("rr", 1.0, 1) else 0.1
        attack = attack_record(
            method=config.method,
            epsilon=eps,
            memorization={"epsilon_lb": lb, "canaries": 20, "alpha": 0.05},
            one_run={"epsilon_lb": 0.2, "canaries": 20, "alpha": 0.05},
            label_inference={"gap": 0.01},
        )
        store.record(
            spec.name, name, config.to_dict(), tmp_path, metrics, attack, "2026-01-01T00:00:00"
        )
    return spec, store


def test_the_report_shows_caps_the_bound_tested_violations_and_stale_rows(tmp_path):
    from attacks import memorization, one_run
    from labeldp.report import STALE, summary, write_report
    from paper_figs.plots import write_figures

    spec, store = _fake_audited_store(tmp_path)
    table = summary(store, spec).set_index(["method", "epsilon"], drop=False)
    mem_cap, one_cap = memorization.epsilon_lb_max(20), one_run.epsilon_lb_max(20)  # 1.05, 1.35
    # Old attack.json lacks the caps: they are recomputed from the canary counts.
    assert (table["eps_lb_memorization_max"] == mem_cap).all()
    assert (table["eps_lb_one_run_max"] == one_cap).all()
    # DP-SGD is held to 2ε; 2 is above both caps, so neither audit can fail there.
    dpsgd = table.loc[("dp-sgd", 1.0)]
    assert dpsgd["bound_tested"] == 2.0 and dpsgd["relation"] == "add or remove one example"
    assert dpsgd["memorization_cannot_fail"] and dpsgd["one_run_cannot_fail"]
    rr1 = table.loc[("rr", 1.0)]
    assert rr1["bound_tested"] == 1.0 and not rr1["memorization_cannot_fail"]
    assert rr1["memorization_violations"] == 1 and rr1["seeds_with_violation"] == 1
    assert rr1["eps_lb_memorization_min"] == pytest.approx(0.1)
    assert table.loc[("pate-fm", 4.0), "stale_seeds"] == 1
    assert table.loc[("pate-fm", 4.0), "note"] == f"{STALE} (1 of 2 seeds)"
    assert table.loc[("rr", 4.0), "note"] == ""

    md, csv = write_report(store, spec, "facts.toml", tmp_path / "results")
    text = md.read_text()
    assert "| rr | 1 | 1 | 0.57 | 1.05 | 0.20 | 1.35 | **1 of 2** |" in text
    assert "| dp-sgd | 1 | 2 (2ε) | 0.10 | 1.05† | 0.20 | 1.35† | 0 of 2 |" in text
    assert "| rr | 4 | 4 | 0.10 | 1.05† |" in text
    assert "| pate-fm ‡ | 4 | 4 |" in text and f"‡ {STALE}." in text
    assert "| pate-fm ‡ | 50.00 ± 0.00 |" in text  # the accuracy table marks it too
    assert "ε above what 20 memorization / 20 audit canaries can certify" in text
    # every method at 50 %: rr is never ahead of dp-sgd, so ε* lies above the grid
    assert "| rr | > 4 (not ahead at any ε of the grid's top) |" in text
    # What the mean over seeds is, said in the report.
    assert "the mean is not itself a 95 % lower bound" in text and "90 % confidence" in text
    header = csv.read_text().splitlines()[0]
    assert header.startswith("method,variant,epsilon,accuracy_mean,accuracy_std,seeds")
    assert "eps_lb_memorization_max" in header and header.endswith(",note")
    paths = write_figures(store, spec, tmp_path / "figs")
    assert {p.name for p in paths} >= {"facts_audit.png", "facts_utility.png"}


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
    finished = finished_runs(runs / "tiny")

    assert cli.main(argv) == 0
    after = _rows(db)
    assert len(after) == 10 and len({key for _, key, _ in after}) == 10  # nothing lost or twice
    assert after[: len(before)] == before  # finished rows untouched
    # finished runs were not redone
    assert finished_runs(runs / "tiny").items() >= finished.items()


def test_a_sweep_with_two_workers_stores_every_run_once(data_dir, tmp_path):
    spec = SweepSpec.load(_sweep_file(tmp_path, text=TINY.replace("seeds = [0, 1]", "seeds = [0]")))
    store = ResultsStore(tmp_path / "runs.sqlite")
    env = Environment(data_dir=str(data_dir), progress=False)
    assert run_sweep(spec, store, tmp_path / "runs", env, backend=LocalBackend(2)) == 5
    rows = store.rows("tiny")
    assert sorted(r["name"] for r in rows) == sorted(name for name, _ in spec.runs())


# A utility sweep and its companion audit sweep (``audits = ...``), for the key's
# validation and the side-by-side table.
UTILITY = (
    """
name = "util"
dataset = "fashion-mnist"
methods = ["rr", "dp-sgd", "pate-fm"]
epsilons = [1, 4]
seeds = [0]
train_size = 5000
canaries = 20
audit_canaries = 20
audits = "util_audits.toml"
"""
    + DPSGD_PATE_OPTIONS
)

COMPANION = """
name = "util_audits"
dataset = "fashion-mnist"
methods = ["rr", "dp-sgd"]
epsilons = [1, 2, 4]
seeds = [0]
train_size = 700
canaries = 40
audit_canaries = 40

[train]
epochs = 1

[method_options.dp-sgd]
delta = 1e-5
"""


def _pair(tmp_path: Path, utility: str = UTILITY, companion: str = COMPANION) -> Path:
    (tmp_path / "util_audits.toml").write_text(companion)
    path = tmp_path / "util.toml"
    path.write_text(utility)
    return path


def test_the_audits_key_names_a_companion_sweep_that_covers_the_grid(tmp_path):
    spec = SweepSpec.load(_pair(tmp_path))
    assert spec.audits == "util_audits.toml" and spec.audit_spec is not None
    assert spec.audit_spec.name == "util_audits" and spec.audit_spec.run["train_size"] == 700
    assert SweepSpec.load(tmp_path / "util.toml", follow_audits=False).audit_spec is None
    # The companion is no part of the utility grid.
    assert {n for n, _ in spec.runs()} == {
        n for n, _ in SweepSpec.load(_pair(tmp_path, UTILITY.replace("audits =", "#"))).runs()
    }
    no_canaries = COMPANION.replace("canaries = 40\naudit_canaries = 40\n", "")
    bad = {
        "no such sweep file": (UTILITY.replace("util_audits.toml", "nope.toml"), COMPANION),
        "audits must be a string": (UTILITY.replace('"util_audits.toml"', "3"), COMPANION),
        "its dataset is mnist, not fashion-mnist": (
            UTILITY,
            COMPANION.replace('dataset = "fashion-mnist"', 'dataset = "mnist"'),
        ),
        "it lacks rr at ε = 4": (UTILITY, COMPANION.replace("[1, 2, 4]", "[1, 2]")),
        "it lacks the non-private run": (UTILITY, "include_nonprivate = false\n" + COMPANION),
        "carry no canaries": (UTILITY, no_canaries),
        "it has this sweep's name 'util'": (UTILITY, COMPANION.replace('"util_audits"', '"util"')),
        "names an audit sweep of its own": (UTILITY, 'audits = "util.toml"\n' + COMPANION),
        "it has a [grid]": (UTILITY, COMPANION + "[grid]\n'train.lr' = [0.1, 0.2]\n"),
        # pate-fm is not in the companion: allowed only while the utility runs have
        # canaries of their own to audit it with.
        "it lacks method pate-fm": (
            UTILITY.replace("canaries = 20\naudit_canaries = 20\n", ""),
            COMPANION,
        ),
    }
    for fragment, (utility, companion) in bad.items():
        path = _pair(tmp_path, utility, companion)
        with pytest.raises(ConfigError) as info:
            SweepSpec.load(path)
        message = str(info.value)
        assert fragment in message and str(path) in message, (fragment, message)
        assert "audits" in message


def _record(store: ResultsStore, spec: SweepSpec, accuracy, lbs, caps=(None, None)) -> None:
    """Stores every grid point of ``spec`` without training: test accuracy
    ``accuracy(method, ε)``, ε_LB ``lbs(method, ε)`` = (memorization, one-run)."""
    for name, config in spec.runs():
        eps = config.method_options.get("epsilon")
        mem, one = lbs(config.method, eps)
        metrics = run_record(
            method=config.method,
            epsilon=eps,
            delta=None if eps is None else config.method_options.get("delta", 0.0),
            test_accuracy=accuracy(config.method, eps),
            train_seconds=1.0,
            ledger={"entries": [] if eps is None else [{"details": {"stopping_rule": "x"}}]},
        )
        attack = attack_record(
            method=config.method,
            epsilon=eps,
            memorization={"epsilon_lb": mem, "canaries": config.canaries, "alpha": 0.05},
            one_run={"epsilon_lb": one, "canaries": config.audit_canaries, "alpha": 0.05},
            label_inference={"gap": 0.01},
        )
        store.record(spec.name, name, config.to_dict(), "/x", metrics, attack, "2026-01-01")


def test_the_report_shows_accuracy_beside_the_audit_sweeps_bounds(tmp_path):
    from attacks import memorization, one_run
    from labeldp.report import OWN_RUNS_MARK, write_report

    spec, store = SweepSpec.load(_pair(tmp_path)), ResultsStore(tmp_path / "runs.sqlite")
    # Utility runs: accuracy 0.6 (0.9 non-private), weak bounds 0.01 / 0.02.
    _record(store, spec, lambda m, e: 0.9 if e is None else 0.6, lambda m, e: (0.01, 0.02))
    # Audit runs, without rr at ε = 4: strong bounds 1.5 / 1.6 non-private, else ε / 10.
    companion = spec.audit_spec
    _record(
        store,
        companion,
        lambda m, e: 0.3,
        lambda m, e: (1.5, 1.6) if e is None else (e / 10, e / 20),
    )
    with sqlite3.connect(tmp_path / "runs.sqlite") as db:
        db.execute("DELETE FROM runs WHERE sweep = 'util_audits' AND name = 'rr-eps4-seed0'")
    md, csv = write_report(store, spec, "util.toml", tmp_path / "results")
    text = md.read_text()
    mem_cap, one_cap = memorization.epsilon_lb_max(40), one_run.epsilon_lb_max(40)
    assert "## Accuracy next to what the audit runs leak (util_audits)" in text
    # Accuracy from the utility runs, ε_LB and caps from the audit runs.
    assert f"| none | ∞ | 90.00 | ∞ | 1.50 | {mem_cap:.2f} | 1.60 | {one_cap:.2f} |" in text
    assert f"| rr | 1 | 60.00 | 1 | 0.10 | {mem_cap:.2f} | 0.05 | {one_cap:.2f} |" in text
    # dp-sgd is held to 2ε; at ε = 4 that is above both caps (†).
    assert f"| dp-sgd | 1 | 60.00 | 2 (2ε) | 0.10 | {mem_cap:.2f}† |" in text
    assert f"| dp-sgd | 4 | 60.00 | 8 (2ε) | 0.40 | {mem_cap:.2f}† | 0.20 |" in text
    # No stored audit run of rr at ε = 4: dashes, and the report says so.
    assert "| rr | 4 | 60.00 | – | – |" in text
    assert "no run of sweep util_audits in the store yet for 1 of 7 rows" in text
    # pate-fm is not in the audit sweep: its own runs' bounds, marked.
    assert f"| pate-fm | 1 | 60.00 | 1 | 0.01{OWN_RUNS_MARK} |" in text
    # The sentence saying where each column comes from: sweeps and training set sizes.
    assert "utility runs of sweep util (5,000 training examples" in text
    assert "audit runs of sweep util_audits (same method and ε, seed [0], 700 training" in text
    assert "40 memorization and 40 audit canaries" in text
    assert f"{OWN_RUNS_MARK} pate-fm is not in the audit sweep" in text
    # The utility runs' own audit section is still there, with their own bounds.
    assert "## What the runs leak" in text and "| rr | 1 | 1 | 0.01 |" in text
    # The CSV has the merged columns.
    rows = pd.read_csv(csv)
    assert {"audit_eps_lb_memorization", "audit_eps_lb_one_run", "audit_source"} <= set(rows)
    none = rows[rows["method"] == "none"].iloc[0]
    assert none["audit_eps_lb_memorization"] == 1.5 and none["audit_source"] == "util_audits"
    assert rows[rows["method"] == "pate-fm"]["audit_source"].eq("own runs").all()
    # Without the key, no side-by-side table.
    plain = SweepSpec.load(_pair(tmp_path, UTILITY.replace("audits =", "# audits =")))
    md, csv = write_report(store, plain, "util.toml", tmp_path / "plain")
    assert "Accuracy next to" not in md.read_text() and "audit_source" not in csv.read_text()


def test_reproduce_reports_a_utility_sweep_again_after_its_audit_sweep(
    data_dir, tmp_path, monkeypatch
):
    experiments = tmp_path / "experiments"
    experiments.mkdir()
    small = TINY.format(epochs=1).replace("seeds = [0, 1]", "seeds = [0]")
    small = small.replace('["rr", "alibi"]', '["rr"]').replace("[1, 4]", "[1]")
    (experiments / "tiny.toml").write_text(small.replace("crop_padding = 0", 'audits = "aud.toml"'))
    (experiments / "aud.toml").write_text(small.replace('"tiny"', '"aud"'))
    monkeypatch.setattr(packaged, "folder", lambda: experiments)
    monkeypatch.setattr(cli, "PROFILES", {"quick": ("tiny.toml", "aud.toml")})
    results, figures = tmp_path / "results", tmp_path / "figs"
    argv = [
        "reproduce", "--store", str(tmp_path / "runs.sqlite"), "--runs-dir",
        str(tmp_path / "runs"), "--results-dir", str(results), "--figures-dir", str(figures),
        "--data-dir", str(data_dir), "--quiet",
    ]  # fmt: skip
    assert cli.main(argv) == 0
    text = (results / "tiny.md").read_text()
    assert "Accuracy next to what the audit runs leak (aud)" in text
    assert "no run of sweep aud in the store yet" not in text  # written again after aud ran
    assert "| rr | 1 |" in text.split("Accuracy next to")[1]
    assert (results / "aud.md").exists() and (figures / "aud_audit.png").exists()
