"""pate-fm's diagnostics (outside the guarantee): every key present and consistent with
the stored raw votes, the ceiling student, resume, and the report section."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from labeldp import cli
from labeldp.data.formats import read_idx
from labeldp.errors import ConfigError
from labeldp.methods import build_method
from labeldp.methods.pate_fm import PateFM, answer_diagnostics, teacher_accuracy_summary
from labeldp.pate_report import pate_diagnostics_section
from labeldp.train import loop

KEYS = {
    "queries_pool", "queries_considered", "queries_answered", "answer_rate",
    "answer_rate_pool", "label_accuracy_of_answers", "ensemble_accuracy_pool",
    "ensemble_accuracy_answered", "answer_histogram", "answered_label_histogram",
    "epsilon_data_dependent", "teacher_accuracy", "teacher_accuracy_mean",
    "teacher_accuracy_min", "teacher_accuracy_max", "ceiling_student_accuracy",
    "ceiling_student_outcome",
}  # fmt: skip


pytestmark = pytest.mark.fake_fashion(n_train=300, n_test=60)


def _argv(data_dir, out, *extra, epsilon="500"):
    return [
        "train", "--dataset", "fashion-mnist", "--method", "pate-fm", "--epsilon", epsilon,
        "--teachers", "4", "--queries", "50", "--threshold", "2", "--sigma1", "1",
        "--sigma2", "1", "--teacher-steps", "10", "--teacher-batch", "8", "--mu", "2",
        "--teacher-lr", "0.1", "--teacher-group", "2", "--teacher-model", "cnn-tanh",
        "--fixmatch-threshold", "0.9", "--norm", "group", "--model", "cnn-tanh",
        "--epochs", "2", "--batch-size", "10", "--crop-padding", "0",
        "--data-dir", str(data_dir), "--out", str(out), "--quiet", *extra,
    ]  # fmt: skip


def _metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def test_every_diagnostic_is_recorded_and_consistent(data_dir, tmp_path):
    out = tmp_path / "run"
    argv = _argv(data_dir, out, "--canaries", "10")
    argv[argv.index("--sigma2") + 1] = "3"  # a noisy argmax: answers differ from the votes
    assert cli.main(argv) == 0
    metrics = _metrics(out)
    d = metrics["diagnostics"]
    assert KEYS <= set(d)
    record = torch.load(out / "pate.noisy.pt", weights_only=True)
    considered = int((record[0] >= 0).sum())
    answered = record[0, :considered].numpy().astype(bool)
    answers = record[1, :considered].numpy()[answered]
    a = int(answered.sum())
    assert a > 0
    assert d["queries_pool"] == 50 and d["queries_considered"] == considered
    assert d["queries_answered"] == a == metrics["method_details"]["answered"]
    assert d["answer_rate"] == pytest.approx(a / considered)
    assert d["answer_rate_pool"] == pytest.approx(a / 50)
    # diagnostics compare with the true labels (the file's), not the canaries' planted ones
    labels = torch.from_numpy(read_idx(data_dir / "train-labels-idx1-ubyte.gz").astype(np.int64))
    canaries = torch.load(out / "diagnostics" / "canaries.pt", weights_only=True)
    seen = labels.clone()
    seen[canaries["indices"]] = canaries["canary_labels"].to(torch.int64)
    assert not torch.equal(seen, labels)
    pool = record[2]
    pool_labels = labels[pool].numpy()
    assert not np.array_equal(pool_labels, seen[pool].numpy())  # the pool holds canaries
    votes = torch.load(out / "diagnostics" / "pate_votes.pt", weights_only=True).numpy()
    assert votes.shape == (50, 10)
    plurality = votes.argmax(1)
    assert d["ensemble_accuracy_pool"] == pytest.approx((plurality == pool_labels).mean())
    on_answered = np.zeros(50, bool)
    on_answered[:considered] = answered
    assert d["ensemble_accuracy_answered"] == pytest.approx(
        (plurality == pool_labels)[on_answered].mean()
    )
    assert d["label_accuracy_of_answers"] == pytest.approx(
        (answers == pool_labels[on_answered]).mean()
    )
    assert d["answer_histogram"] == np.bincount(answers, minlength=10).tolist()
    assert (
        d["answered_label_histogram"]
        == np.bincount(pool_labels[on_answered], minlength=10).tolist()
    )
    assert sum(d["answer_histogram"]) == sum(d["answered_label_histogram"]) == a
    teachers = d["teacher_accuracy"]
    assert len(teachers) == 4 and all(0 <= t <= 1 for t in teachers)
    assert d["teacher_accuracy_mean"] == pytest.approx(np.mean(teachers))
    assert (d["teacher_accuracy_min"], d["teacher_accuracy_max"]) == (min(teachers), max(teachers))
    # each a multiple of 1/60 (60 test images)
    assert all(abs(t * 60 - round(t * 60)) < 1e-9 for t in teachers)
    assert 0 <= d["ceiling_student_accuracy"] <= 1
    assert d["ceiling_student_outcome"] in ("finished", "collapsed")  # trained, tiny fake data
    # options round-trip, and the ceiling leaves nothing beside the released model
    options = metrics["method_options"]
    assert options["ceiling_student"] is True
    assert build_method("pate-fm", options).options() == options
    assert not [p for p in out.rglob("*") if "ceiling" in p.name]
    assert sorted(p.name for p in (out / "diagnostics").glob("teacher-accuracy-*.pt")) == [
        "teacher-accuracy-0.pt",
        "teacher-accuracy-2.pt",
    ]


def test_the_ceiling_student_leaves_the_released_outputs_unchanged(data_dir, tmp_path, monkeypatch):
    """The same run with the ceiling skipped (same configuration, so the same noise key)
    releases the same answers and the same model."""
    assert cli.main(_argv(data_dir, tmp_path / "with")) == 0
    calls = []

    def skipped(self, ctx, fit, true, taught):
        calls.append(1)
        return {"ceiling_student_accuracy": None, "ceiling_student_outcome": "off"}

    monkeypatch.setattr(PateFM, "_ceiling", skipped)
    assert cli.main(_argv(data_dir, tmp_path / "without")) == 0
    assert calls == [1]
    runs = [tmp_path / "with", tmp_path / "without"]
    releases = [torch.load(r / "pate.noisy.pt", weights_only=True) for r in runs]
    assert torch.equal(releases[0], releases[1])
    models = [torch.load(r / "model.pt", weights_only=True) for r in runs]
    assert all(torch.equal(models[0][k], models[1][k]) for k in models[0])
    outputs = [torch.load(r / "diagnostics" / "outputs.pt", weights_only=True) for r in runs]
    for key, value in outputs[0].items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, outputs[1][key]), key
    metrics = [_metrics(r) for r in runs]
    assert metrics[0]["test_accuracy"] == metrics[1]["test_accuracy"]
    timeless = [[{k: v for k, v in e.items() if k != "seconds"} for e in m["history"]]
                for m in metrics]  # fmt: skip
    assert timeless[0] == timeless[1]
    assert metrics[0]["diagnostics"]["ceiling_student_accuracy"] is not None


def test_a_run_resumed_in_the_ceiling_student_gives_the_same_diagnostics(
    data_dir, tmp_path, monkeypatch
):
    assert cli.main(_argv(data_dir, tmp_path / "whole")) == 0
    original = loop.Trainer._train_epoch

    def interrupt(self, epoch):
        if self.description == "ceiling-student" and epoch == 1:
            raise KeyboardInterrupt
        return original(self, epoch)

    monkeypatch.setattr(loop.Trainer, "_train_epoch", interrupt)
    out = tmp_path / "run"
    assert cli.main(_argv(data_dir, out)) == 130
    # the ceiling checkpoints under diagnostics/, never beside the student's
    assert (out / "diagnostics" / "ceiling-student.ckpt").exists()
    assert not (out / "ceiling-student.ckpt").exists() and (out / "student.ckpt").exists()
    monkeypatch.setattr(loop.Trainer, "_train_epoch", original)
    assert cli.main(_argv(data_dir, out, "--resume")) == 0
    resumed, whole = _metrics(out), _metrics(tmp_path / "whole")
    assert resumed["diagnostics"] == whole["diagnostics"]
    assert resumed["test_accuracy"] == whole["test_accuracy"]
    assert not (out / "diagnostics" / "ceiling-student.ckpt").exists()


def test_no_answers_make_the_ceiling_the_untrained_model(data_dir, tmp_path):
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match="no query answered"):
        assert cli.main(_argv(data_dir, out, epsilon="0.01")) == 0
    metrics = _metrics(out)
    d = metrics["diagnostics"]
    assert KEYS <= set(d)
    assert d["queries_answered"] == 0
    assert d["answer_rate_pool"] == 0
    assert d["answer_rate"] == (0 if d["queries_considered"] else None)
    assert d["label_accuracy_of_answers"] is None and d["ensemble_accuracy_answered"] is None
    assert 0 <= d["ensemble_accuracy_pool"] <= 1  # the noiseless votes exist all the same
    assert d["answer_histogram"] == [0] * 10 == d["answered_label_histogram"]
    assert d["ceiling_student_outcome"] == "untrained"
    assert d["ceiling_student_accuracy"] == metrics["test_accuracy"]


def test_the_ceiling_student_option():
    base = {"epsilon": 1.0, "teachers": 2, "queries": 5, "threshold": 1, "sigma1": 1,
            "sigma2": 1}  # fmt: skip
    assert PateFM(**base).options()["ceiling_student"] is True
    off = PateFM(**base, ceiling_student=False)
    assert off.options()["ceiling_student"] is False
    assert build_method("pate-fm", off.options()).options() == off.options()
    with pytest.raises(ConfigError, match="ceiling_student"):
        PateFM(**base, ceiling_student="yes")
    # a diagnostic: it does not change which teachers' votes a run may share
    from labeldp.methods.pate_fm import VOTE_INDEPENDENT_OPTIONS

    assert "ceiling_student" in VOTE_INDEPENDENT_OPTIONS


def test_answer_diagnostics_by_hand():
    votes = np.array([[3, 1, 0], [2, 2, 0], [0, 1, 3], [0, 4, 0]])
    labels = np.array([0, 1, 2, 1])  # query 1 ties: the plurality is class 0
    d = answer_diagnostics(votes, labels, np.array([True, True, False]), np.array([0, 2]), 3)
    assert d["queries_pool"] == 4 and d["queries_considered"] == 3
    assert d["queries_answered"] == 2
    assert d["answer_rate"] == pytest.approx(2 / 3) and d["answer_rate_pool"] == 0.5
    assert d["ensemble_accuracy_pool"] == 0.75  # right on 0, 2, 3
    assert d["ensemble_accuracy_answered"] == 0.5  # answered 0 (right), 1 (tie, wrong)
    assert d["label_accuracy_of_answers"] == 0.5  # answers 0 (right), 2 (≠ 1)
    assert d["answer_histogram"] == [1, 0, 1]
    assert d["answered_label_histogram"] == [1, 1, 0]
    with pytest.raises(ValueError):
        answer_diagnostics(votes, labels, np.array([True]), np.array([0, 1]), 3)
    summary = teacher_accuracy_summary(torch.tensor([0.5, float("nan"), 0.75]))
    assert summary["teacher_accuracy"] == [0.5, None, 0.75]
    assert summary["teacher_accuracy_mean"] == 0.625
    assert (summary["teacher_accuracy_min"], summary["teacher_accuracy_max"]) == (0.5, 0.75)
    assert teacher_accuracy_summary(torch.tensor([float("nan")]))["teacher_accuracy_mean"] is None


def _row(method, epsilon, seed, metrics):
    return {"method": method, "epsilon": epsilon, "seed": seed, "metrics": json.dumps(metrics)}


def _pate_metrics(answered, accuracy, *, split="test", ceiling=0.9):
    diagnostics = {
        "queries_pool": 100, "queries_considered": 80, "queries_answered": answered,
        "answer_rate": answered / 80, "answer_rate_pool": answered / 100,
        "label_accuracy_of_answers": 0.8, "ensemble_accuracy_pool": 0.7,
        "teacher_accuracy": [0.5, 0.6], "teacher_accuracy_mean": 0.55,
        "teacher_accuracy_min": 0.5, "teacher_accuracy_max": 0.6,
        "ceiling_student_accuracy": ceiling, "answer_histogram": [answered, 0, 0],
    }  # fmt: skip
    metrics = {"evaluation_split": split, "diagnostics": diagnostics,
               "test_accuracy": None, "validation_accuracy": None}  # fmt: skip
    metrics["validation_accuracy" if split == "validation" else "test_accuracy"] = accuracy
    return metrics


def test_the_report_section_from_hand_made_rows():
    assert pate_diagnostics_section(pd.DataFrame([_row("rr", 1.0, 0, {})])) == []
    rows = pd.DataFrame(
        [
            _row("rr", 1.0, 0, {"test_accuracy": 0.1}),
            _row("pate-fm", 2.0, 0, _pate_metrics(40, 0.6)),
            _row("pate-fm", 2.0, 1, _pate_metrics(60, 0.8, split="validation", ceiling=0.7)),
            # made before the diagnostics: only what metrics.json already had
            _row("pate-fm", 0.5, 0, {"test_accuracy": 0.3,
                                     "method_details": {"answered": 5, "considered": 9},
                                     "method_options": {"queries": 100},
                                     "diagnostics": {"label_accuracy_of_answers": 0.4}}),
        ]
    )  # fmt: skip
    lines = pate_diagnostics_section(rows)
    assert "## PATE-FM diagnostics (outside the guarantee)" in lines
    table = [line for line in lines if line.startswith("|")]
    assert len(table) == 4  # header, rule, ε = 0.5, ε = 2
    header = [c.strip() for c in table[0].strip("|").split("|")]
    assert len(table[1].strip("|").split("|")) == len(header)
    old, new = ([c.strip() for c in row.strip("|").split("|")] for row in table[2:])
    cells = dict(zip(header, new, strict=True))
    assert cells["ε"] == "2" and cells["seeds"] == "2"
    assert cells["answered / considered / pool"] == "50 / 80 / 100"
    assert cells["answer rate (%)"] == "62.50"
    assert cells["answered-label accuracy"] == "80.00"
    assert cells["noiseless ensemble accuracy (pool)"] == "70.00"
    assert cells["teacher accuracy mean (min–max)"] == "55.00 (50.00–60.00)"
    assert cells["ceiling student"] == "80.00"  # mean of 0.9 and 0.7
    assert cells["student"] == "70.00"  # test 0.6 and validation 0.8
    assert cells["answer histogram"] == "[50, 0, 0]"
    cells = dict(zip(header, old, strict=True))
    assert cells["ε"] == "0.5"
    assert cells["answered / considered / pool"] == "5 / 9 / 100"
    assert cells["answered-label accuracy"] == "40.00" and cells["student"] == "30.00"
    for column in (
        "answer rate (%)",
        "noiseless ensemble accuracy (pool)",
        "teacher accuracy mean (min–max)",
        "ceiling student",
        "answer histogram",
    ):
        assert cells[column] == "–", column  # fmt: skip
    with pytest.raises(ConfigError, match="metrics"):
        pate_diagnostics_section(pd.DataFrame([{"method": "pate-fm", "epsilon": 1, "seed": 0}]))
