"""Where runs execute (labeldp.backends) without Ray: the driver's scheduling (share groups,
capacity, errors), run folders sent back as archives, federated sweeps on a process
pool, and the errors of misused backend options. Ray itself: tests/test_ray.py."""

from __future__ import annotations

import io
import sqlite3
import tarfile
import threading
from concurrent.futures import Executor, Future
from pathlib import Path

import pytest
from fakes import isolate_data_sources, write_learnable_fashion

from labeldp import backends
from labeldp.backends import LocalBackend, RayBackend, drive, pack_folder, unpack_folder
from labeldp.cli import main
from labeldp.errors import ConfigError
from labeldp.sweep import share_group


class DeferredExecutor(Executor):
    """Runs nothing until the test completes a future: exposes what is in flight."""

    def __init__(self) -> None:
        self.in_flight: list[tuple[Future, tuple]] = []
        self.submitted: list[tuple] = []
        self.max_in_flight = 0
        self.shut = False

    def submit(self, fn, /, *args, **kwargs):
        future: Future = Future()
        self.in_flight.append((future, args))
        self.submitted.append(args)
        self.max_in_flight = max(self.max_in_flight, len(self.in_flight))
        return future

    def shutdown(self, wait=True, *, cancel_futures=False):
        self.shut = True


def _run_drive(items, capacity, group, fail_on=None):
    """drive() in a thread; the main thread completes the in-flight futures one by one
    (oldest first) and records the order in which items were submitted."""
    executor = DeferredExecutor()
    finished: list[str] = []
    errors: list[BaseException] = []

    def target():
        try:
            drive(executor, items, lambda name: name, lambda item: (item,), finished.append,
                  capacity, group)  # fmt: skip
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    while thread.is_alive():
        if executor.in_flight:
            future, (name,) = executor.in_flight.pop(0)
            if name == fail_on:
                future.set_exception(RuntimeError(f"{name} failed"))
            else:
                future.set_result(name)
        thread.join(0.01)
    return executor, finished, errors


def test_a_share_group_waits_for_its_first_run_and_capacity_is_respected():
    items = ["pate-a1", "rr-1", "pate-a2", "pate-b1", "pate-a3", "rr-2", "pate-b2"]

    def group(item):
        return item.split("-")[1][0] if item.startswith("pate") else None

    executor, finished, errors = _run_drive(items, capacity=2, group=group)
    assert not errors and sorted(finished) == sorted(items) and executor.shut
    assert executor.max_in_flight <= 2
    order = [args[0] for args in executor.submitted]
    for first, follower in (("pate-a1", "pate-a2"), ("pate-a1", "pate-a3"),
                            ("pate-b1", "pate-b2")):  # fmt: skip
        # a follower is submitted only after its group's first run has finished
        assert finished.index(first) < order.index(follower)


def test_a_failing_run_propagates_and_the_executor_is_shut_down():
    executor, finished, errors = _run_drive(["a", "b", "c"], 1, lambda item: None, fail_on="b")
    assert len(errors) == 1 and "b failed" in str(errors[0])
    assert finished == ["a"] and executor.shut


def test_pate_runs_differing_only_in_their_budget_share_their_teachers():
    def config(method, **options):
        return {"dataset": "fashion-mnist", "method": method, "method_options": options,
                "train": {"seed": 0}}  # fmt: skip

    a = share_group(config("pate-fm", epsilon=1.0, teachers=20, threshold=50.0))
    b = share_group(config("pate-fm", epsilon=4.0, teachers=20, threshold=30.0))
    c = share_group(config("pate-fm", epsilon=1.0, teachers=40))
    assert a is not None and a == b and a != c
    assert share_group(config("rr", epsilon=1.0)) is None


def test_a_folder_comes_back_whole_and_replaces_what_was_there(tmp_path):
    source = tmp_path / "run"
    (source / "diagnostics").mkdir(parents=True)
    (source / "metrics.json").write_text("{}")
    (source / "diagnostics" / "votes.pt").write_bytes(b"\x00\x01")
    dest = tmp_path / "back" / "run"
    dest.mkdir(parents=True)
    (dest / "stale.txt").write_text("old")
    unpack_folder(pack_folder(source), dest)
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*")) == [
        "diagnostics", "diagnostics/votes.pt", "metrics.json",
    ]  # fmt: skip
    assert (dest / "diagnostics" / "votes.pt").read_bytes() == b"\x00\x01"
    assert [p.name for p in dest.parent.iterdir()] == ["run"]  # no staging left behind


def test_an_archive_reaching_outside_its_folder_is_refused(tmp_path):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        info = tarfile.TarInfo("../escaped.txt")
        info.size = 1
        archive.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(tarfile.TarError):
        unpack_folder(buffer.getvalue(), tmp_path / "dest" / "run")
    assert not (tmp_path / "dest" / "escaped.txt").exists()
    assert not list((tmp_path / "dest").iterdir())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"cpus_per_run": 0}, "cpus_per_run must be an integer ≥ 1"),
        ({"num_cpus": 0}, "num_cpus must be an integer ≥ 1"),
        ({"gpus_per_run": -1}, "gpus_per_run must be a number ≥ 0"),
        ({"run_folders": "nfs"}, "run_folders must be one of shared, return"),
        ({"max_retries": -1}, "max_retries must be an integer ≥ 0"),
    ],
)
def test_bad_ray_options_are_refused_by_name(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        RayBackend(**kwargs)
    with pytest.raises(ConfigError, match="workers must be an integer ≥ 1"):
        LocalBackend(0)


def test_the_ray_backend_without_ray_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "ray", None)
    with pytest.raises(ConfigError, match=r"pip install 'labeldp\[ray\]'"):
        backends.import_ray()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--address", "auto"], "--address applies to --backend ray only"),
        (["--run-folders", "return"], "--run-folders applies to --backend ray only"),
        (["--cpus-per-run", "2"], "--cpus-per-run applies to --backend ray only"),
        (["--backend", "ray", "--address", "auto", "--workers", "2"],
         "with --address the cluster's resources decide"),
    ],
)  # fmt: skip
def test_misused_backend_flags_are_refused(flags, message, capsys):
    assert main(["sweep", "fashion_mnist_quick", *flags]) == 2
    assert message in capsys.readouterr().err


FEDERATED = """
name = "fl_pool"
kind = "federation"
dataset = "fashion-mnist"
seeds = [0]
target_accuracy = 0.3
[options]
clients = 20
concurrency = 4
buffer_size = 2
server_steps = 3
eval_every = 3
local_batch = 8
[grid]
algorithm = ["fedavg", "fedbuff"]
"""


def test_a_federated_sweep_on_two_local_workers_stores_each_point_once(tmp_path, monkeypatch):
    isolate_data_sources(monkeypatch, tmp_path)
    data = write_learnable_fashion(tmp_path / "data", n_train=200, n_test=50)
    monkeypatch.chdir(tmp_path)
    Path("fl_pool.toml").write_text(FEDERATED)
    args = ["sweep", "fl_pool.toml", "--store", "s.sqlite", "--data-dir", str(data), "--quiet"]
    assert main([*args, "--workers", "2"]) == 0
    db = sqlite3.connect("s.sqlite")
    rows = db.execute("SELECT name FROM federated_runs").fetchall()
    assert sorted(r[0] for r in rows) == ["fedavg-seed0", "fedbuff-seed0"]
    assert main(args) == 0  # all stored: nothing reruns
    assert db.execute("SELECT COUNT(*) FROM federated_runs").fetchone()[0] == 2


def test_runs_finished_beside_a_failing_one_are_still_stored():
    from labeldp.backends import SerialExecutor

    def task(name):
        if name == "bad":
            raise RuntimeError("bad failed")
        return name

    finished: list[str] = []
    with pytest.raises(RuntimeError, match="bad failed"):
        drive(SerialExecutor(), ["bad", "good"], task, lambda item: (item,), finished.append, 2)
    assert finished == ["good"]  # done before the failure was seen: stored, not lost


def test_replay_flags_without_the_ray_backend_are_refused(capsys):
    assert main(["fl", "--out", "x", "--actors", "4"]) == 2
    assert "--actors applies to --backend ray only" in capsys.readouterr().err
