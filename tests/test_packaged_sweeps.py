"""The sweep files are package data (labeldp/experiments/*.toml), found through
importlib.resources: every packaged file loads, a command takes a packaged file's name or
the path of the user's own file, a wrong name is one line listing the packaged ones, and a
wheel built from the source tree carries them (so an installed labeldp needs no checkout)."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import zipfile
from importlib.resources import files
from pathlib import Path

import pytest
from fakes import run_record

from labeldp import cli
from labeldp import experiments as packaged
from labeldp.errors import ConfigError
from labeldp.fl.study import FederatedSweep, is_federated
from labeldp.sweep import SweepSpec

ROOT = Path(__file__).resolve().parents[1]


def test_the_packaged_sweep_files_are_found_through_importlib_resources():
    assert packaged.folder() == files("labeldp.experiments")
    on_disk = sorted(p.stem for p in (ROOT / "labeldp" / "experiments").glob("*.toml"))
    assert packaged.names() == on_disk and "fashion_mnist_quick" in on_disk
    for files_of_profile in cli.PROFILES.values():
        for name in files_of_profile:
            assert packaged.find(name).is_file(), name


@pytest.mark.parametrize("name", packaged.names())
def test_every_packaged_sweep_file_loads(name):
    if is_federated(packaged.find(name)):
        assert FederatedSweep.load(packaged.find(name)).points
        return
    spec = SweepSpec.load(packaged.find(name))
    assert spec.runs()
    if spec.audits is not None:  # the companion is found next to the packaged file
        assert spec.audit_spec is not None
        assert (packaged.folder() / spec.audits).is_file()


def test_a_name_with_or_without_toml_is_the_packaged_file():
    path = packaged.folder() / "fashion_mnist_quick.toml"
    assert packaged.resolve("fashion_mnist_quick") == path
    assert packaged.resolve("fashion_mnist_quick.toml") == path
    assert packaged.find("fashion_mnist_quick") == path


def test_the_users_own_file_wins_over_a_packaged_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("fashion_mnist_quick.toml").write_text("mine")
    assert packaged.resolve("fashion_mnist_quick.toml") == Path("fashion_mnist_quick.toml")
    assert packaged.resolve(tmp_path / "fashion_mnist_quick.toml").read_text() == "mine"
    assert packaged.resolve("fashion_mnist_quick") == packaged.folder() / "fashion_mnist_quick.toml"


@pytest.mark.parametrize("wrong", ["fashion_mnist_quik", "somewhere/fashion_mnist_quick.toml"])
def test_a_name_that_is_neither_lists_the_packaged_ones(wrong):
    with pytest.raises(
        ConfigError,
        match=r"is no packaged sweep file \(did you mean fashion_mnist_quick[ ?]"
        r".*the packaged: cifar100_paper",
    ):
        packaged.resolve(wrong)
    with pytest.raises(ConfigError, match="is no packaged sweep file"):
        packaged.find(wrong)


def test_the_cli_names_a_wrong_sweep_in_one_line(capsys):
    assert cli.main(["sweep", "fashion_mnist_quik", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("labeldp sweep: error: sweep file")
    # the closest names come first: the whole list is longer than an error line may be
    assert "(did you mean fashion_mnist_quick or " in err
    assert "give the path of your own TOML file" in err


def test_a_zipped_install_reads_the_files_from_a_copy(tmp_path, monkeypatch):
    """Where the package is no folder on disk (a zip import), the sweep files are copied
    to a temporary folder once, so that a companion still lies beside its sweep file."""
    archive = tmp_path / "labeldp.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for path in packaged.folder().glob("*.toml"):
            z.write(path, f"labeldp/experiments/{path.name}")
    monkeypatch.setattr(packaged, "files", lambda _: zipfile.Path(archive, "labeldp/experiments/"))
    packaged._extracted.cache_clear()
    try:
        copy = packaged.folder()
        assert copy != files("labeldp.experiments") and copy.is_dir()
        assert packaged.names() == sorted(p.stem for p in copy.glob("*.toml"))
        assert SweepSpec.load(packaged.resolve("fashion_mnist_quick")).audit_spec is not None
    finally:
        packaged._extracted.cache_clear()


@pytest.mark.skipif(
    importlib.util.find_spec("setuptools") is None or importlib.util.find_spec("pip") is None,
    reason="building a wheel offline needs pip and setuptools in this environment",
)
def test_a_wheel_carries_the_sweep_files(tmp_path):
    """A non-editable install is a wheel: built from a copy of the source tree (so that the
    checkout gets no build/ folder), offline, it holds every packaged sweep file."""
    source = tmp_path / "src"
    skip = shutil.ignore_patterns("__pycache__", "*.png", "*.pdf", "*.egg-info", "build")
    for name in ("labeldp", "attacks", "paper_figs"):
        shutil.copytree(ROOT / name, source / name, ignore=skip)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-q",
            str(source),
            "-w",
            str(tmp_path / "dist"),
        ],  # fmt: skip
        check=True,
        capture_output=True,
        timeout=120,
    )
    (wheel,) = (tmp_path / "dist").glob("labeldp-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in packaged.names():
        assert f"labeldp/experiments/{name}.toml" in names, name
    assert "labeldp/experiments/README.md" in names
    assert {"labeldp/cli.py", "attacks/harness.py", "paper_figs/plots.py"} <= names


def test_outside_a_checkout_runs_record_no_commit_and_the_report_says_so(tmp_path, monkeypatch):
    """An installed labeldp (its folder not the top of a git work tree, even inside some
    other checkout) records no commit, and its reports say why instead of 'None'."""
    from labeldp import provenance
    from labeldp.report import write_report
    from labeldp.store import ResultsStore

    assert provenance.git_commit(ROOT / "labeldp") == (None, None)  # inside a checkout
    assert provenance.git_commit(tmp_path) == (None, None)
    monkeypatch.setattr(provenance, "_STARTUP_COMMIT", (None, None))
    spec = SweepSpec.load(packaged.resolve("fashion_mnist_quick"))
    store = ResultsStore(tmp_path / "runs.sqlite")
    name, config = spec.runs()[0]
    metrics = run_record(method=config.method, **provenance.provenance())
    store.record(spec.name, name, config.to_dict(), "/x", metrics, None, "2026-01-01")
    md, _ = write_report(store, spec, "fashion_mnist_quick", tmp_path / "results")
    text = md.read_text()
    assert "at commits none (not run from a git checkout)" in text
    assert "(installed, no git checkout)" in text and "at commit None" not in text
    assert "`labeldp sweep fashion_mnist_quick`" in text
