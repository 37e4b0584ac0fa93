"""The Ray backend (the optional extra labeldp[ray]) on a local cluster on 127.0.0.1,
started here with ``ray start --head`` and stopped afterwards: a sweep on Ray stores the
rows the local backend stores (both run-folder modes), a killed driver loses and
duplicates nothing, and a federation replayed on Ray actors is bit-identical to the
local replay. Skipped when Ray is not installed (``make test`` without the extra);
``make test-ray`` installs it and runs these."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from fakes import finished_runs

ray = pytest.importorskip("ray")

from labeldp.backends import LocalBackend, RayBackend  # noqa: E402
from labeldp.fl import simulator as sim  # noqa: E402
from labeldp.fl.population import dirichlet  # noqa: E402
from labeldp.fl.ray_replay import RayReplay  # noqa: E402
from labeldp.fl.schedule import ScheduleConfig  # noqa: E402
from labeldp.runner import Environment  # noqa: E402
from labeldp.store import ResultsStore  # noqa: E402
from labeldp.sweep import SweepSpec, run_sweep  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.fake_fashion(n_train=300, n_test=100)]

RAY = str(Path(sys.executable).parent / "ray")

TINY = """
name = "tiny"
dataset = "fashion-mnist"
methods = ["rr"]
epsilons = [1, 4]
seeds = [0]
canaries = 20
audit_canaries = 20
crop_padding = 0
[train]
epochs = 1
batch_size = 50
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    """The address of a two-CPU Ray cluster on 127.0.0.1 (head node only), without
    token authentication (nothing outside this machine can reach it)."""
    saved = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"  # the cluster, this process and the drivers
    port = _free_port()
    subprocess.run(
        [RAY, "start", "--head", f"--port={port}", "--num-cpus=2", "--node-ip-address=127.0.0.1",
         "--include-dashboard=false", "--disable-usage-stats"],
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([RAY, "stop", "--force"], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)  # fmt: skip
        if saved is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = saved


@pytest.fixture
def connected(cluster):
    ray.init(address=cluster, log_to_driver=False, configure_logging=False)
    try:
        yield cluster
    finally:
        ray.shutdown()


def _rows(db: Path) -> list[tuple]:
    if not db.exists():
        return []
    try:
        with sqlite3.connect(db) as conn:
            return conn.execute(
                "SELECT name, key, test_accuracy, eps_lb_memorization, eps_lb_one_run, numerics,"
                " finished_at FROM runs ORDER BY name"
            ).fetchall()
    except sqlite3.OperationalError:  # no table yet
        return []


@pytest.mark.parametrize("run_folders", ["shared", "return"])
def test_a_sweep_on_ray_stores_the_rows_of_the_local_backend(
    connected, data_dir, tmp_path, run_folders
):
    (tmp_path / "tiny.toml").write_text(TINY)
    spec = SweepSpec.load(tmp_path / "tiny.toml")
    env = Environment(data_dir=str(data_dir), progress=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the thread count of each Ray run (cpus_per_run 1)
    try:
        assert run_sweep(spec, ResultsStore(tmp_path / "local.sqlite"), tmp_path / "local",
                         env, LocalBackend(1)) == 3  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    backend = RayBackend(address=connected, run_folders=run_folders,
                         scratch_dir=str(tmp_path / "scratch"))  # fmt: skip
    assert run_sweep(spec, ResultsStore(tmp_path / "ray.sqlite"), tmp_path / "ray", env,
                     backend) == 3  # fmt: skip
    local, remote = _rows(tmp_path / "local.sqlite"), _rows(tmp_path / "ray.sqlite")
    assert [r[:6] for r in local] == [r[:6] for r in remote]  # all but the finishing time
    for name, *_ in remote:  # the folders are at the driver in both modes
        assert (tmp_path / "ray" / "tiny" / name / "metrics.json").exists()
        assert (tmp_path / "ray" / "tiny" / name / "attack.json").exists()


def _sweep_command(tmp_path: Path, cluster: str, db: Path, runs: Path, data_dir) -> list[str]:
    """`labeldp sweep` of the tiny sweep (written to tmp_path) on the cluster, as a child
    process's argv."""
    (tmp_path / "tiny.toml").write_text(TINY)
    return [sys.executable, "-m", "labeldp.cli", "sweep", str(tmp_path / "tiny.toml"),
            "--backend", "ray", "--address", cluster, "--store", str(db), "--runs-dir",
            str(runs), "--data-dir", str(data_dir), "--quiet"]  # fmt: skip


def test_a_killed_driver_loses_and_duplicates_no_run(cluster, data_dir, tmp_path):
    db, runs = tmp_path / "k.sqlite", tmp_path / "runs"
    argv = _sweep_command(tmp_path, cluster, db, runs, data_dir)
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not _rows(db) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    before = _rows(db)
    assert 1 <= len(before) < 3, "the driver should have been killed part-way"
    finished = finished_runs(runs / "tiny")
    assert subprocess.run(argv, capture_output=True).returncode == 0
    after = _rows(db)
    assert len(after) == 3 and len({r[1] for r in after}) == 3  # nothing lost or twice
    assert set(before) <= set(after)  # finished rows untouched
    # finished runs were not redone
    assert finished_runs(runs / "tiny").items() >= finished.items()


def test_a_lost_worker_is_retried_and_its_run_stored_once(cluster, data_dir, tmp_path):
    db, runs = tmp_path / "w.sqlite", tmp_path / "runs"
    argv = _sweep_command(tmp_path, cluster, db, runs, data_dir)
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    killed, deadline = None, time.monotonic() + 300
    while killed is None and time.monotonic() < deadline and process.poll() is None:
        # a Ray worker process running a grid point: kill -9 it, as a lost node would die
        found = subprocess.run(["pgrep", "-f", "ray::_execute"], capture_output=True, text=True)
        pids = [int(p) for p in found.stdout.split()]
        if pids:
            os.kill(pids[0], signal.SIGKILL)
            killed = pids[0]
        time.sleep(0.05)
    assert killed is not None, "no worker was seen running a grid point"
    _, err = process.communicate(timeout=600)
    assert process.returncode == 0, err.decode()[-2000:]
    rows = _rows(db)
    assert len(rows) == 3 and len({r[1] for r in rows}) == 3  # retried, stored once each


@pytest.mark.parametrize("label_privacy", ["rr", "rr-prior"])
def test_a_federation_on_ray_actors_is_bit_identical_to_the_local_replay(
    connected, label_privacy
):
    from test_fl_simulator import TEST, TRAIN, config

    population = dirichlet(TRAIN.labels.numpy(), 24, alpha=0.5, seed=0, min_size=4)
    cfg = config(
        schedule=ScheduleConfig(concurrency=12, buffer_size=4, server_steps=5),
        label_privacy=label_privacy, epsilon=2.0, chunk_size=2,
    )  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # each actor's thread count
    try:
        local = sim.run_federation(cfg, TRAIN, TEST, population, progress=False)
    finally:
        torch.set_num_threads(threads)
    remote = sim.run_federation(cfg, TRAIN, TEST, population, progress=False,
                                replay=RayReplay(actors=2, address=connected))  # fmt: skip
    assert torch.equal(local.parameters, remote.parameters)
    assert local.history == remote.history
    assert local.overflows == remote.overflows == 0


def test_requests_the_cluster_cannot_meet_are_refused_not_left_pending(connected, tmp_path):
    from labeldp.errors import ConfigError

    (tmp_path / "tiny.toml").write_text(TINY)
    spec = SweepSpec.load(tmp_path / "tiny.toml")
    with pytest.raises(ConfigError, match="no node of the Ray cluster has 8 CPUs"):
        run_sweep(spec, ResultsStore(tmp_path / "s.sqlite"), tmp_path / "runs",
                  Environment(progress=False), RayBackend(address=connected, cpus_per_run=8))
    from test_fl_simulator import TEST, TRAIN, config

    population = dirichlet(TRAIN.labels.numpy(), 12, alpha=0.5, seed=0, min_size=4)
    with pytest.raises(ConfigError, match="3 actors of 1 CPUs need 3 CPUs"):
        sim.run_federation(config(), TRAIN, TEST, population, progress=False,
                           replay=RayReplay(actors=3, address=connected))
    assert ray.is_initialized()  # the test's connection, left as it was
