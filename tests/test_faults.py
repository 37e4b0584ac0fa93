"""Bad input and faults end in one clear line (or a recorded outcome), never a traceback:
extreme DP-SGD accounting, diverged training, huge ε in the attacks, corrupt run records,
a full disk; and the FixMatch teachers' learning-rate schedule is the spec's."""

from __future__ import annotations

import errno
import json
import math
import os
import resource
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from attacks.label_inference import label_inference
from labeldp import cli
from labeldp import io as labeldp_io
from labeldp.errors import ConfigError, DataError
from labeldp.privacy import calibrate_dpsgd_noise, dpsgd_epsilon
from labeldp.records import to_json_value
from labeldp.train.ensemble import EnsembleFixMatchConfig, StackedModels
from labeldp.train.schedule import learning_rate

# ------------------------------------------------------------------ helpers


@pytest.fixture
def memory_cap():
    """Caps the address space at 4 GiB above its current size for the test, so that an
    unbounded allocation fails at once (MemoryError) instead of exhausting the machine."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        pytest.skip("needs /proc to cap the memory")
    size_kib = next(
        int(line.split()[1]) for line in status.splitlines() if line.startswith("VmSize")
    )
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = size_kib * 1024 + 4 * 2**30
    if hard != resource.RLIM_INFINITY and hard < cap:
        pytest.skip("the hard memory limit is below the cap")
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    yield
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _train(data_dir: Path, out: Path, *extra: str) -> int:
    return cli.main(
        ["train", "--dataset", "fashion-mnist", "--epochs", "1", "--batch-size", "50",
         "--data-dir", str(data_dir), "--out", str(out), "--quiet", "--no-download", *extra]
    )  # fmt: skip


def _error_line(err: str, command: str) -> str:
    """The one error line of ``labeldp COMMAND`` in ``err`` (other lines are notes)."""
    assert "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if line.startswith(f"labeldp {command}")]
    assert len(lines) == 1, err
    return lines[0]


# ------------------------------------------------------------------ DP-SGD accounting


def test_a_tiny_noise_multiplier_is_refused_naming_the_option(memory_cap, capsys):
    # Was: dp-accounting tried to allocate 38 GiB (MemoryError traceback).
    with pytest.raises(ConfigError, match="noise_multiplier must be ≥ 0.01"):
        dpsgd_epsilon(0.001, 0.01, 10, 1e-5)
    argv = ["account", "dp-sgd", "--noise-multiplier", "0.001", "--sample-rate", "0.01"]
    assert cli.main([*argv, "--steps", "10"]) == 2
    assert "--noise-multiplier must be ≥ 0.01" in _error_line(capsys.readouterr().err, "account")


@pytest.mark.parametrize(
    "sigma, q, steps",
    [(1.0, 0.01, 10**11), (5.0, 1.0, 10**9), (0.05, 0.5, 10**6)],
    ids=["huge-steps", "unsampled-huge-steps", "small-sigma-many-steps"],
)
def test_extreme_settings_are_accounted_in_bounded_memory(memory_cap, sigma, q, steps):
    # Was: a MemoryError traceback (the PLD grid would have needed 80 GiB to 800 GiB).
    pld = dpsgd_epsilon(sigma, q, steps, 1e-5)
    rdp = dpsgd_epsilon(sigma, q, steps, 1e-5, "rdp")
    assert math.isfinite(pld) and 0 < pld <= rdp  # a valid upper bound, never above RDP's


def test_cli_account_with_a_huge_step_count_prints_epsilon(memory_cap, capsys):
    argv = ["account", "dp-sgd", "--noise-multiplier", "1", "--sample-rate", "0.01"]
    assert cli.main([*argv, "--steps", str(10**11)]) == 0
    assert "ε = " in capsys.readouterr().out


def test_calibration_refuses_a_target_no_noise_multiplier_meets(memory_cap, capsys):
    # Was: the search went below any meaningful σ and the PLD allocation blew up.
    for accountant in ("rdp", "pld"):
        with pytest.raises(ConfigError, match=r"ask for ε ≤ [0-9.]+"):
            calibrate_dpsgd_noise(1e6, 1e-5, 0.01, 100, accountant)
    argv = ["account", "dp-sgd", "--epsilon", "1e6", "--sample-rate", "0.01", "--steps", "100"]
    assert cli.main(argv) == 2
    assert "smallest noise multiplier" in _error_line(capsys.readouterr().err, "account")


def test_calibration_keeps_its_promise_at_the_edges(memory_cap):
    for target, q, steps in ((0.5, 0.02, 400), (200.0, 0.01, 50)):
        sigma = calibrate_dpsgd_noise(target, 1e-5, q, steps)
        assert (1 - 1e-3) * target <= dpsgd_epsilon(sigma, q, steps, 1e-5) <= target


# ------------------------------------------------------------------ divergence


def test_a_diverged_run_is_recorded_with_its_outcome(data_dir, tmp_path, capsys):
    # Was: NaN metrics made the JSON encoder fail and the run was lost.
    out = tmp_path / "diverged"
    assert _train(data_dir, out, "--epochs", "3", "--lr", "1e6") == 0
    metrics = json.loads((out / "metrics.json").read_text())  # strict JSON: no NaN
    assert metrics["outcome"] == "diverged"
    assert len(metrics["history"]) == 1 and metrics["history"][-1]["diverged"] is True
    assert metrics["history"][-1]["train_loss"] is None  # NaN, recorded as null
    assert 0 <= metrics["test_accuracy"] <= 1  # as measured, of the diverged model
    assert "diverged" in capsys.readouterr().err
    assert not list(out.glob("*.ckpt"))
    fine = tmp_path / "fine"
    assert _train(data_dir, fine) == 0
    assert json.loads((fine / "metrics.json").read_text())["outcome"] == "finished"


def test_to_json_value_writes_nan_as_null_and_infinities_as_strings():
    value = {"a": [1.0, math.nan, (math.inf, -math.inf)], "b": {"c": 2}, "d": "x"}
    assert to_json_value(value) == {
        "a": [1.0, None, ["Infinity", "-Infinity"]],
        "b": {"c": 2},
        "d": "x",
    }


# ------------------------------------------------------------------ attacks, records


def test_label_inference_bound_does_not_overflow_for_huge_epsilon():
    probs = torch.eye(3)[torch.tensor([0, 1, 2, 0])]
    labels = torch.tensor([0, 1, 2, 1])
    for epsilon in (1e6, math.inf):
        result = label_inference(probs, labels, probs, labels, epsilon, 1e-5)
        assert result["dp_bound_estimate_on_train_accuracy"] == 1.0
    small = label_inference(probs, labels, probs, labels, 0.1, 1e-5)
    assert small["dp_bound_estimate_on_train_accuracy"] == pytest.approx(
        math.exp(0.1) * 0.75 + 1e-5
    )


def test_attack_on_a_run_with_huge_epsilon(data_dir, tmp_path, capsys):
    run = tmp_path / "rr"
    assert _train(data_dir, run, "--method", "rr", "--epsilon", "1e6") == 0
    assert cli.main(["attack", str(run)]) == 0  # was: OverflowError in math.exp
    assert (
        json.loads((run / "attack.json").read_text())["label_inference"][
            "dp_bound_estimate_on_train_accuracy"
        ]
        == 1.0
    )


def test_attack_and_resume_on_corrupt_records_name_the_file(data_dir, tmp_path, capsys):
    run = tmp_path / "rr"
    assert _train(data_dir, run, "--method", "rr", "--epsilon", "2") == 0
    capsys.readouterr()
    for name in ("metrics.json", "config.json"):
        bad = tmp_path / f"bad-{name}"
        shutil.copytree(run, bad)
        (bad / name).write_text((run / name).read_text()[:40])  # truncated
        assert cli.main(["attack", str(bad)]) == 1  # was: a JSONDecodeError traceback
        line = _error_line(capsys.readouterr().err, "attack")
        assert f"{bad / name} is corrupt" in line and "train it again" in line
        code = _train(data_dir, bad, "--method", "rr", "--epsilon", "2", "--resume")
        assert code == 1
        line = _error_line(capsys.readouterr().err, "train")
        assert f"{bad / name} is corrupt" in line and f"delete {bad}" in line


def test_read_json_names_the_file_and_what_to_do(tmp_path):
    path = tmp_path / "x.json"
    path.write_text('{"a": ')
    with pytest.raises(DataError, match=r"x\.json is corrupt .*line 1.*; do this"):
        labeldp_io.read_json(path, "do this")
    path.write_text('{"a": 1}')
    assert labeldp_io.read_json(path, "do this") == {"a": 1}


# ------------------------------------------------------------------ full disk


class _FullDisk:
    """A file handle whose writes fail as on a full disk."""

    def __init__(self, handle):
        self._handle = handle

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.close()


def _fill_disk_for(monkeypatch: pytest.MonkeyPatch, marker: str) -> None:
    """Writes through labeldp.io.atomic_write to files whose name contains ``marker``
    fail with ENOSPC (inside torch.save too, which turns that into a RuntimeError)."""
    names: dict[int, str] = {}
    real_mkstemp, real_fdopen = tempfile.mkstemp, os.fdopen

    def mkstemp(*args, **kwargs):
        fd, name = real_mkstemp(*args, **kwargs)
        names[fd] = name
        return fd, name

    def fdopen(fd, *args, **kwargs):
        handle = real_fdopen(fd, *args, **kwargs)
        return _FullDisk(handle) if marker in Path(names.pop(fd, "")).name else handle

    monkeypatch.setattr(labeldp_io.tempfile, "mkstemp", mkstemp)
    monkeypatch.setattr(labeldp_io.os, "fdopen", fdopen)


def test_atomic_write_on_a_full_disk_names_the_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    path = tmp_path / "state.ckpt"
    labeldp_io.atomic_write(path, lambda handle: torch.save({"v": 1}, handle))
    _fill_disk_for(monkeypatch, ".ckpt")
    with pytest.raises(labeldp_io.DiskFullError, match="disk is full") as info:
        labeldp_io.atomic_write(path, lambda handle: torch.save({"v": 2}, handle))
    assert str(path) in str(info.value)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["state.ckpt"]  # no temporary left


def test_a_full_disk_during_a_checkpoint_says_so_and_resume_continues(
    data_dir, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "run"
    _fill_disk_for(monkeypatch, ".ckpt")
    assert _train(data_dir, out, "--epochs", "2") == 1  # was: torch's RuntimeError
    line = _error_line(capsys.readouterr().err, "train")
    assert "disk is full" in line and str(out / "train.ckpt") in line and "--resume" in line
    monkeypatch.undo()
    assert _train(data_dir, out, "--epochs", "2", "--resume") == 0
    assert json.loads((out / "metrics.json").read_text())["outcome"] == "finished"


# ------------------------------------------------------------------ FixMatch schedule


def test_fixmatch_teachers_follow_the_spec_cosine(monkeypatch):
    # The spec (and FixMatch): lr·cos(7πk / 16K), ending at cos(7π/16)·lr, not at 0.
    config = EnsembleFixMatchConfig(steps=8, lr=0.03)
    assert config.schedule == "fixmatch"
    expected = [0.03 * math.cos(7 * math.pi * k / (16 * 8)) for k in range(8)]
    assert [learning_rate(k, 8, 0.03, config.schedule, 0.0) for k in range(8)] == (
        pytest.approx(expected)
    )
    assert learning_rate(8, 8, 0.03, "fixmatch", 0.0) == pytest.approx(
        0.03 * math.cos(7 * math.pi / 16)
    )
    # ... and the ensemble's training loop uses it.
    from fakes import two_class_halves

    from labeldp.augment import Normalize, WeakAugment
    from labeldp.strong_augment import StrongAugment
    from labeldp.train import config as train_config
    from labeldp.train import ensemble

    seen = []

    def spy(step, total, peak, kind, warmup):
        seen.append(learning_rate(step, total, peak, kind, warmup))
        return seen[-1]

    # the one optimizer configuration (SGDConfig) computes every loop's learning rate
    monkeypatch.setattr(train_config, "learning_rate", spy)
    images, labels = two_class_halves(n=40)
    models = [torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 2)) for _ in range(2)]
    ensemble.train_fixmatch_ensemble(
        StackedModels(models), images, labels, [torch.arange(0, 10), torch.arange(10, 20)],
        EnsembleFixMatchConfig(steps=8, batch_size=2, mu=1, lr=0.03),
        normalize=Normalize((0.3,), (0.3,)), weak=WeakAugment(crop_padding=0, hflip=False),
        strong=StrongAugment(num_ops=1, cutout_fraction=0.25), progress=False,
    )  # fmt: skip
    assert seen == pytest.approx(expected)
