"""The quick profile's audit sweep (labeldp/experiments/fashion_mnist_quick_audits.toml): it covers
the quick sweep's grid, its canaries can certify well above ε = 3, and it stays within its
share of `make reproduce`'s time (checked on the grid, without training)."""

from __future__ import annotations

import shutil
from pathlib import Path

from attacks import memorization, one_run
from labeldp import cli
from labeldp import experiments as packaged
from labeldp.sweep import SweepSpec

EXPERIMENTS = packaged.folder()
QUICK, AUDITS = "fashion_mnist_quick.toml", "fashion_mnist_quick_audits.toml"
#: The line fashion_mnist_quick.toml takes to show the audit sweep's ε_LB in its report.
AUDITS_LINE = f'audits = "{AUDITS}"'
#: Training examples × epochs of one small-CNN audit run that the time budget allows: about
#: 10 s of training at ~0.25 ms per example and epoch on an idle 2-core CPU, so that the 17
#: runs (with their evaluation, attacks and dp-sgd's cheaper runs) take under 4 minutes.
EXAMPLE_EPOCHS_PER_RUN = 40_000


def _quick_with_audits(tmp_path: Path) -> Path:
    """fashion_mnist_quick.toml with the ``audits`` line (if it lacks it), beside a copy of
    the audit sweep file."""
    text = (EXPERIMENTS / QUICK).read_text()
    if "audits =" not in text:
        text = text.replace("\n[train]", f"\n{AUDITS_LINE}\n\n[train]", 1)
    shutil.copy(EXPERIMENTS / AUDITS, tmp_path / AUDITS)
    path = tmp_path / QUICK
    path.write_text(text)
    return path


def test_the_quick_profile_runs_its_audit_sweep_after_the_utility_sweep():
    assert cli.PROFILES["quick"] == (QUICK, AUDITS)


def test_the_audit_sweep_covers_the_quick_grid_and_the_key_accepts_it(tmp_path):
    spec = SweepSpec.load(_quick_with_audits(tmp_path))
    audits = spec.audit_spec
    assert audits is not None and audits.name == "fashion_mnist_quick_audits"
    assert audits.dataset == spec.dataset and audits.include_nonprivate and audits.seeds == [0]
    # Every method of the quick sweep but pate-fm (audited by its own utility runs' canaries)
    # at the quick sweep's ε grid.
    assert set(spec.methods) - set(audits.methods) == {"pate-fm"} and spec.audited
    for method in audits.methods:
        assert audits.method_epsilons(method) == spec.method_epsilons(method) == [1, 4]
    assert len(audits.runs()) == 1 + 4 * 2


def test_the_audit_canaries_can_certify_well_above_three():
    audits = SweepSpec.load(EXPERIMENTS / AUDITS)
    canaries, audit_canaries = audits.run["canaries"], audits.run["audit_canaries"]
    assert memorization.epsilon_lb_max(canaries) > 4.1  # 4.19 for 400
    assert one_run.epsilon_lb_max(audit_canaries) > 4.4  # 4.46 for 400
    # The canaries are planted in the training subset, which they must leave mostly clean.
    assert canaries + audit_canaries <= 0.4 * audits.run["train_size"]


def test_the_audit_runs_are_set_up_to_memorize_within_the_time_budget():
    audits = SweepSpec.load(EXPERIMENTS / AUDITS)
    for name, config in audits.runs():
        # No augmentation, no weight decay, one evaluation at the end.
        assert config.crop_padding == 0 and config.hflip is False, name
        assert config.train.weight_decay == 0.0, name
        assert config.train.eval_every >= config.train.epochs, name
        assert config.train_size * config.train.epochs <= EXAMPLE_EPOCHS_PER_RUN, name
        if config.method != "dp-sgd":
            assert config.model == "cnn" and config.train.batch_size <= 64, name
