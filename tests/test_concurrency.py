"""Runs that cannot collide: a run folder is trained by one process at a time (a second
one is refused in one line, a sweep skips the grid point), the lock dies with its holder,
and sweep workers die with the sweep."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fakes import isolate_data_sources, write_learnable_fashion

from labeldp import cli
from labeldp.locking import LOCK_NAME, FolderLocked, folder_lock
from labeldp.runner import Environment, RunConfig, train_run
from labeldp.store import ResultsStore
from labeldp.sweep import SweepSpec, run_sweep
from labeldp.train import TrainConfig

HOLD = (
    "import sys, time\n"
    "from labeldp.locking import folder_lock\n"
    "with folder_lock(sys.argv[1]):\n"
    "    time.sleep(120)\n"
)


pytestmark = pytest.mark.fake_fashion(n_train=200, n_test=50)


def _hold(folder: Path) -> subprocess.Popen:
    """Another process holding ``folder``'s lock (until killed)."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and holder.poll() is None:
        lock = folder / LOCK_NAME
        if lock.exists() and lock.read_text().strip() == str(holder.pid):
            return holder
        time.sleep(0.05)
    holder.kill()
    raise AssertionError("the lock holder did not start")


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=30)


def _config(**options) -> RunConfig:
    train = TrainConfig(epochs=1, batch_size=50, seed=0)
    return RunConfig(
        dataset="fashion-mnist",
        train=train,
        method="rr",
        method_options={"epsilon": 4.0, "secure_noise": True, **options},
        crop_padding=0,
    )


def test_a_run_folder_is_trained_by_one_process_at_a_time(data_dir, tmp_path):
    out = tmp_path / "conc"
    env = Environment(data_dir=str(data_dir), progress=False)
    holder = _hold(out)
    try:
        with pytest.raises(FolderLocked, match=f"in use by another process \\(pid {holder.pid}\\)"):
            train_run(_config(), out, env)
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # nothing read or written
    finally:
        _stop(holder)  # kill -9: the kernel releases the lock
    metrics = train_run(_config(), out, env)
    assert (out / "metrics.json").exists() and metrics.epsilon == 4.0
    with folder_lock(out), folder_lock(out):  # re-entrant within one process
        pass


def test_a_second_labeldp_train_into_a_busy_folder_is_one_line(data_dir, tmp_path, capsys):
    out = tmp_path / "conc"
    argv = ["train", "--dataset", "fashion-mnist", "--data-dir", str(data_dir), "--epochs", "1",
            "--method", "rr", "--epsilon", "4", "--secure-noise", "--out", str(out)]  # fmt: skip
    holder = _hold(out)
    try:
        assert cli.main(argv) == 2
    finally:
        _stop(holder)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0] == (
        f"labeldp train: error: {out} is in use by another process (pid {holder.pid}); "
        "wait for it to finish, or choose another folder"
    )
    assert not (out / "config.json").exists() and not (out / "rr.noisy.pt").exists()


SWEEP = """
name = "busy"
dataset = "fashion-mnist"
methods = ["rr"]
epsilons = [1, 4]
seeds = [0]
include_nonprivate = false
crop_padding = 0

[train]
epochs = {epochs}
batch_size = 50
"""


def test_a_sweep_skips_a_grid_point_another_process_is_training(data_dir, tmp_path, capsys):
    path = tmp_path / "busy.toml"
    path.write_text(SWEEP.format(epochs=1))
    spec = SweepSpec.load(path)
    store = ResultsStore(tmp_path / "runs.sqlite")
    env = Environment(data_dir=str(data_dir), progress=False)
    runs = tmp_path / "runs"
    busy = runs / "busy" / "rr-eps1-seed0"
    holder = _hold(busy)
    try:
        assert run_sweep(spec, store, runs, env) == 1
    finally:
        _stop(holder)
    assert [r["name"] for r in store.rows("busy")] == ["rr-eps4-seed0"]
    assert not (busy / "config.json").exists()  # not trained a second time
    out = capsys.readouterr().out
    assert f"rr-eps1-seed0: skipped, {busy} is in use by another process (pid {holder.pid})" in out
    assert run_sweep(spec, store, runs, env) == 1  # once free, a rerun trains it
    assert sorted(r["name"] for r in store.rows("busy")) == ["rr-eps1-seed0", "rr-eps4-seed0"]


def _children(parent: int) -> list[int]:
    """The pids of ``parent``'s sweep workers (spawned interpreters)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == parent and b"spawn_main" in cmdline:
            found.append(int(entry))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sweep_workers_die_with_the_sweep(tmp_path, monkeypatch):
    isolate_data_sources(monkeypatch, tmp_path)
    data = write_learnable_fashion(tmp_path / "data", n_train=2000, n_test=50)
    path = tmp_path / "busy.toml"
    path.write_text(SWEEP.format(epochs=200))  # minutes per run
    runs = tmp_path / "runs"
    argv = ["sweep", str(path), "--store", str(tmp_path / "runs.sqlite"), "--runs-dir",
            str(runs), "--data-dir", str(data), "--workers", "2", "--quiet"]  # fmt: skip
    code = f"import sys; from labeldp.cli import main; sys.exit(main({argv!r}))"
    sweep = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.DEVNULL)
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 120
        started = [runs / "busy" / f"rr-eps{e}-seed0" / "config.json" for e in (1, 4)]
        while time.monotonic() < deadline and not all(p.exists() for p in started):
            assert sweep.poll() is None, "the sweep stopped early"
            time.sleep(0.1)
        assert all(p.exists() for p in started), "the workers did not start training"
        workers = _children(sweep.pid)
        assert len(workers) == 2
        os.kill(sweep.pid, signal.SIGKILL)
        sweep.wait(timeout=30)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(map(_alive, workers)):
            time.sleep(0.1)
        assert not any(map(_alive, workers)), "sweep workers outlived the sweep"
    finally:
        _stop(sweep)
        for pid in workers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    metrics = runs / "busy" / "rr-eps1-seed0" / "metrics.json"
    assert not metrics.exists()


def test_the_parent_watcher_kills_a_worker_whose_parent_is_gone():
    """The fallback where PR_SET_PDEATHSIG is unavailable: a changed parent pid."""
    code = "from labeldp.backends import _watch_parent; _watch_parent(-1); print('alive')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert done.returncode == -signal.SIGKILL and b"alive" not in done.stdout


def test_metrics_record_the_numerics_settings(data_dir, tmp_path):
    import torch

    metrics = train_run(_config(), tmp_path / "run", Environment(data_dir=str(data_dir)))
    recorded = json.loads((tmp_path / "run" / "metrics.json").read_text())["numerics"]
    assert recorded == metrics.numerics
    assert recorded["threads"] == torch.get_num_threads() and recorded["device"] == "cpu"
    assert recorded["torch"] == torch.__version__
