"""pate-fm end to end on tiny generated data: teachers, votes, aggregation within the
budget, the student, the ledger, and resuming without retraining finished teachers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from labeldp import cli
from labeldp.mechanisms.confident_gnmax import ConfidentGNMax
from labeldp.methods import pate_fm
from labeldp.privacy import pate_epsilon

pytestmark = pytest.mark.fake_fashion(n_train=400, n_test=100)


def _argv(data_dir, out, *extra):
    return [
        "train", "--dataset", "fashion-mnist", "--method", "pate-fm", "--epsilon", "500",
        "--teachers", "4", "--queries", "60", "--threshold", "2", "--sigma1", "1",
        "--sigma2", "1", "--teacher-steps", "15", "--teacher-batch", "8", "--mu", "2",
        "--teacher-lr", "0.1",
        "--teacher-group", "2", "--teacher-model", "cnn-tanh", "--fixmatch-threshold", "0.9",
        "--norm", "group", "--model", "cnn-tanh", "--epochs", "2", "--batch-size", "10",
        "--crop-padding", "0", "--data-dir", str(data_dir), "--out", str(out), "--quiet",
        *extra,
    ]  # fmt: skip


def test_pate_fm_records_the_filter_guarantee_and_keeps_votes_out_of_the_release(
    data_dir, tmp_path
):
    out = tmp_path / "run"
    assert cli.main(_argv(data_dir, out)) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    entry = metrics["ledger"]["entries"][0]
    assert entry["mechanism"] == "confident-gnmax" and not entry["details"]["data_dependent"]
    assert entry["details"]["stopping_rule"] == "renyi-filter"
    # label DP; the filter's guarantee is no fixed composition, so it states no event
    assert metrics["ledger"]["relation"] == entry["relation"] == "replace one label"
    assert entry["event"]["class_name"] == "UnsupportedDpEvent" and "Rényi filter" in (
        entry["event_note"]
    )
    # the guarantee is fixed in advance: the budget, or answering the whole pool
    worst = ConfidentGNMax(2, 1, 1).worst_case_epsilon(60, 1e-5)
    assert metrics["epsilon"] == pytest.approx(min(500, worst))
    assert "seed is secret" in entry["condition"]
    assert metrics["method_details"]["answered"] > 0
    record = torch.load(out / "pate.noisy.pt", weights_only=True)
    assert record.shape == (3, 60)  # answered, label, query: no raw votes in the release
    considered = int((record[0] >= 0).sum())
    votes = torch.load(out / "diagnostics" / "pate_votes.pt", weights_only=True)
    votes = votes[:considered].numpy()
    assert (votes.sum(1) == 4).all()  # every teacher voted on every query
    answered = record[0, :considered].numpy().astype(bool)
    diagnostics = metrics["diagnostics"]
    assert diagnostics["epsilon_data_dependent"] == pytest.approx(
        pate_epsilon(votes, answered, 2, 1, 1, 1e-5)
    )
    assert sorted(p.name for p in (out / "diagnostics").glob("votes-*.pt")) == [
        "votes-0.pt",
        "votes-2.pt",
    ]
    assert "NOT COVERED" in (out / "diagnostics" / "NOTICE.txt").read_text()
    details = metrics["method_details"]
    assert details["answered"] == int(answered.sum()) and details["considered"] == considered
    assert "label_accuracy_of_answers" not in details
    assert 0 <= diagnostics["label_accuracy_of_answers"] <= 1


def test_every_canary_is_in_the_query_pool(data_dir, tmp_path):
    out = tmp_path / "run"
    assert cli.main(_argv(data_dir, out, "--canaries", "20", "--audit-canaries", "20")) == 0
    record = torch.load(out / "pate.noisy.pt", weights_only=True)
    canaries = torch.load(out / "diagnostics" / "canaries.pt", weights_only=True)
    pool = set(record[2].tolist())
    assert len(pool) == 60
    assert set(canaries["indices"].tolist()) <= pool
    assert set(canaries["audit_indices"].tolist()) <= pool
    too_many = _argv(data_dir, tmp_path / "b", "--canaries", "40", "--audit-canaries", "30")
    assert cli.main(too_many) == 2


def test_a_resumed_run_reuses_finished_teachers(data_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    calls = []
    original = pate_fm.train_fixmatch_ensemble

    def counted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # dies while training the second group
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(pate_fm, "train_fixmatch_ensemble", counted)
    assert cli.main(_argv(data_dir, out)) == 130
    kept = out / "diagnostics"
    assert (kept / "votes-0.pt").exists() and not (kept / "votes-2.pt").exists()
    assert cli.main(_argv(data_dir, out, "--resume")) == 0
    assert len(calls) == 3  # the first group was not trained again


def test_runs_differing_only_in_aggregation_share_teachers(data_dir, tmp_path, monkeypatch):
    calls = []
    original = pate_fm.train_fixmatch_ensemble

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(pate_fm, "train_fixmatch_ensemble", counted)
    shared = ["--shared-dir", str(tmp_path / "shared")]
    assert cli.main(_argv(data_dir, tmp_path / "a", *shared)) == 0
    assert len(calls) == 2  # two groups of two teachers
    # Another ε and σ₂: the same votes, no teacher trained again.
    changed = _argv(data_dir, tmp_path / "b", *shared)
    changed[changed.index("--epsilon") + 1] = "400"
    changed[changed.index("--sigma2") + 1] = "2"
    assert cli.main(changed) == 0
    assert len(calls) == 2
    votes = [_votes(tmp_path / r) for r in "ab"]
    assert torch.equal(votes[0], votes[1])
    # Another seed, or more teacher steps: new teachers.
    assert cli.main(_argv(data_dir, tmp_path / "c", *shared, "--seed", "1")) == 0
    assert len(calls) == 4
    steps = _argv(data_dir, tmp_path / "d", *shared)
    steps[steps.index("--teacher-steps") + 1] = "16"
    assert cli.main(steps) == 0
    assert len(calls) == 6
    # The votes folder holds votes, not teacher checkpoints.
    assert not list((tmp_path / "shared").rglob("*.ckpt"))
    assert len(list((tmp_path / "shared" / "diagnostics" / "pate-votes").iterdir())) == 3


def test_votes_recomputed_equal_the_shared_ones(data_dir, tmp_path):
    """What sharing assumes: teacher training is deterministic, so reusing stored votes
    equals recomputing them."""
    assert cli.main(_argv(data_dir, tmp_path / "a")) == 0
    assert cli.main(_argv(data_dir, tmp_path / "b")) == 0
    votes = [_votes(tmp_path / r) for r in "ab"]
    assert torch.equal(votes[0], votes[1])
    releases = [torch.load(tmp_path / r / "pate.noisy.pt", weights_only=True) for r in "ab"]
    assert torch.equal(releases[0], releases[1])  # the same run reproduces its noise


def _votes(run: Path) -> torch.Tensor:
    return torch.load(run / "diagnostics" / "pate_votes.pt", weights_only=True)


def test_student_steps_fix_the_student_length_whatever_the_answers(data_dir, tmp_path):
    out = tmp_path / "run"
    assert cli.main(_argv(data_dir, out, "--student-steps", "25")) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    answered = metrics["method_details"]["answered"]
    per_epoch = -(-answered // min(10, answered))  # --batch-size 10
    epochs = len(metrics["history"])
    assert epochs == -(-25 // per_epoch)  # ceil: at least 25 steps, less than one epoch more
    assert 25 <= epochs * per_epoch < 25 + per_epoch
    assert metrics["method_options"]["student_steps"] == 25


def test_a_budget_that_answers_nothing_leaves_the_student_untrained(data_dir, tmp_path):
    """A sweep must survive a small ε: no answers is a result (chance accuracy), recorded
    with the ε of the filter's budget, not a crash."""
    out = tmp_path / "run"
    argv = _argv(data_dir, out)
    argv[argv.index("--epsilon") + 1] = "0.01"
    with pytest.warns(UserWarning, match="no query answered within ε = 0.01"):
        assert cli.main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method_details"]["answered"] == 0
    assert metrics["diagnostics"]["label_accuracy_of_answers"] is None
    assert metrics["history"] == [] and 0 <= metrics["test_accuracy"] <= 1
    assert 0 <= metrics["epsilon"] <= 0.01


def test_the_data_dependent_epsilon_can_be_published_through_gnss(data_dir, tmp_path):
    out = tmp_path / "run"
    argv = _argv(data_dir, out, "--release-data-dependent")
    argv[argv.index("--epsilon") + 1] = "40"
    assert cli.main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    entry = metrics["ledger"]["entries"][0]
    published = entry["details"]["data_dependent_release"]
    assert metrics["epsilon"] == 40  # the release is paid from the budget
    assert published["release_rdp"] == pytest.approx(
        0.25 * entry["details"]["filter"]["rdp_budget"]
    )
    assert published["epsilon_data_dependent_published"] >= 0
    stored = torch.load(out / "pate-epsilon.noisy.pt", weights_only=True)
    assert float(stored[0]) == pytest.approx(published["rdp_published"])
    release = metrics["diagnostics"]["release"]
    assert release["noise_std"] == pytest.approx(
        release["smooth_sensitivity"] * published["sigma_s"]
    )
    # with less of the budget left, fewer queries fit than without the release
    plain = json.loads(_run_metrics(data_dir, tmp_path / "plain", "40").read_text())
    assert metrics["method_details"]["considered"] <= plain["method_details"]["considered"]
    too_small = _argv(
        data_dir, tmp_path / "small", "--release-data-dependent", "--release-share", "1e-6"
    )
    assert cli.main(too_small) == 2
    assert not (tmp_path / "small").exists()  # refused before anything was written


def _run_metrics(data_dir, out, epsilon):
    argv = _argv(data_dir, out)
    argv[argv.index("--epsilon") + 1] = epsilon
    assert cli.main(argv) == 0
    return out / "metrics.json"


def test_a_run_without_a_folder_trains_its_teachers_once(data_dir, monkeypatch):
    """Without a run folder nothing is cached on disk: the votes the aggregation computed
    are the ones the diagnostics use, not a second training of every teacher."""
    from labeldp.runner import Environment, RunConfig, train_run
    from labeldp.train import TrainConfig

    calls = []
    original = pate_fm.train_fixmatch_ensemble

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(pate_fm, "train_fixmatch_ensemble", counted)
    options = {"epsilon": 500.0, "teachers": 4, "queries": 60, "threshold": 2, "sigma1": 1,
               "sigma2": 1, "teacher_steps": 15, "teacher_batch": 8, "mu": 2,
               "teacher_lr": 0.1, "teacher_group": 2, "teacher_model": "cnn-tanh",
               "fixmatch_threshold": 0.9}  # fmt: skip
    config = RunConfig(
        dataset="fashion-mnist",
        train=TrainConfig(epochs=2, batch_size=10),
        method="pate-fm",
        method_options=options,
        model="cnn-tanh",
        norm="group",
        crop_padding=0,
    )
    env = Environment(data_dir=str(data_dir), download=False, progress=False)
    metrics = train_run(config, None, env)
    assert len(calls) == 2  # two groups of two teachers, each trained once
    assert metrics.diagnostics["epsilon_data_dependent"] >= 0
