"""Bad input and environment faults end in one line and an exit status, never a traceback.

The table below is the standing list: each case is a command line (``{data}``, ``{out}``
and ``{tmp}`` filled in per test), the exit status and a regex the one line must match
(the error line on stderr, or the result line on stdout for status 0). New options join
it. Tests after the table cover what one line cannot show: that a refused command leaves
the folder usable, that the run records its data, file modes, SIGTERM.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import sqlite3
import time
from pathlib import Path

import pytest

from labeldp import cli
from labeldp import io as labeldp_io
from labeldp.privacy import calibrate_dpsgd_noise, dpsgd_epsilon
from labeldp.privacy.dpsgd_accounting import replace_one_bound

TRAIN = ["train", "--dataset", "fashion-mnist", "--epochs", "1", "--batch-size", "50",
         "--data-dir", "{data}", "--out", "{out}", "--quiet", "--no-download"]  # fmt: skip
PATE = ["--method", "pate-fm", "--epsilon", "1", "--threshold", "5", "--sigma1", "1",
        "--sigma2", "1"]  # fmt: skip
ACCOUNT = ["account", "dp-sgd"]


def _a_file(tmp: Path) -> None:
    (tmp / "file").write_text("not a folder")


def _read_only(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Folders under ``tmp/ro`` cannot be created, as on a read-only filesystem (the
    tests run as root, whom permissions do not stop)."""
    mkdir = os.mkdir

    def refuse(path, *args, **kwargs):
        if str(path).startswith(str(tmp / "ro")):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", refuse)


def _not_sqlite(tmp: Path) -> None:
    (tmp / "store.sqlite").write_bytes(b"this is not an SQLite database\n" * 100)


# id, argv, exit status, regex of the one line, setup (tmp[, monkeypatch]) or None
CASES = [
    ("bad-epsilon", [*TRAIN, "--method", "rr", "--epsilon", "-1"], 2,
     r"argument --epsilon: must be a number > 0, got '-1'", None),
    ("bad-dataset", ["train", "--dataset", "imagenet"], 2, r"invalid choice: 'imagenet'", None),
    # 6: checks inside a method, before config.json is written
    ("dpsgd-batchnorm",
     [*TRAIN, "--method", "dp-sgd", "--epsilon", "1", "--model", "cnn", "--norm", "batch"], 2,
     r"use --norm group", None),
    ("batch-larger-than-data", [*TRAIN, "--batch-size", "500"], 2,
     r"--batch-size \(batch_size\) must be in 1\.\.400, the number of training examples, "
     r"got 500", None),
    ("dpsgd-batch-larger-than-data",
     [*TRAIN, "--method", "dp-sgd", "--norm", "group", "--epsilon", "1", "--batch-size", "401"],
     2, r"--batch-size \(batch_size\) must be in 1\.\.400", None),
    ("pate-teachers-above-n", [*TRAIN, *PATE, "--teachers", "401", "--queries", "10"], 2,
     r"teachers \(401\) must be at most the examples \(400\)", None),
    ("pate-queries-above-n", [*TRAIN, *PATE, "--teachers", "4", "--queries", "401"], 2,
     r"queries \(401\) must be at most the examples \(400\)", None),
    ("pate-queries-below-canaries",
     [*TRAIN, *PATE, "--teachers", "4", "--queries", "10", "--canaries", "20"], 2,
     r"queries \(10\) must be at least the number of canaries \(20\)", None),
    ("lp-mst-empty-stages", [*TRAIN, "--method", "lp-mst", "--epsilon", "1", "--stages", "600"],
     2, r"600 stages over 400 training examples leave some stages without an example .*"
     r"use fewer stages \(--stages\)", None),
    # 7: canaries that leave no example for label inference
    ("canaries-fill-the-data", [*TRAIN, "--canaries", "200", "--audit-canaries", "200"], 2,
     r"must be at most 399, the 400 training examples less one .*got 200 \+ 200", None),
    # 8: run folders that cannot be one
    ("out-is-a-file", [*TRAIN[:-4], "--out", "{tmp}/file", "--quiet", "--no-download"], 2,
     r"--out .*/file is a file, not a folder; choose another --out", _a_file),
    ("out-under-a-file",
     [*TRAIN[:-4], "--out", "{tmp}/file/run", "--quiet", "--no-download"], 2,
     r"--out .*/file/run is under .*/file, which is a file", _a_file),
    ("out-read-only", [*TRAIN[:-4], "--out", "{tmp}/ro/run", "--quiet", "--no-download"], 1,
     r"cannot write .*/ro.*: Read-only file system; check its permissions, or choose "
     r"another --out", _read_only),
    ("store-not-sqlite",
     ["report", "fashion_mnist_quick", "--store", "{tmp}/store.sqlite",
      "--results-dir", "{tmp}/results"], 1, r"store\.sqlite", _not_sqlite),
    # 10: smaller ones
    ("pate-missing-options", [*TRAIN, "--method", "pate-fm", "--epsilon", "1"], 2,
     r"--method pate-fm needs --teachers, --queries, --threshold, --sigma1, --sigma2$", None),
    ("stage-fractions-negative",
     [*TRAIN, "--method", "lp-2st", "--epsilon", "1", "--stage-fractions", "-0.5,1.5"], 2,
     r"argument --stage-fractions: must be numbers > 0 separated by commas .*'-0\.5,1\.5'",
     None),
    ("account-sample-rate-1",
     [*ACCOUNT, "--noise-multiplier", "2", "--sample-rate", "1", "--steps", "10"], 0,
     r"sample rate 1, steps 10: ε = [0-9.]+", None),
    # 1 and 2: calibration that cannot meet its target says what to change
    ("account-epsilon-below-resolution",
     [*ACCOUNT, "--epsilon", "1e-6", "--sample-rate", "0.01", "--steps", "10"], 2,
     r"cannot calibrate .* ask for ε ≥ 0\.0036, or give the noise multiplier", None),
    ("dpsgd-epsilon-below-resolution",
     [*TRAIN, "--method", "dp-sgd", "--norm", "group", "--epsilon", "1e-6"], 2,
     r"cannot calibrate .* ask for ε ≥ [0-9.]+, or give the noise multiplier instead of a "
     r"target$", None),
    ("account-epsilon-above-floor",
     [*ACCOUNT, "--epsilon", "1e6", "--sample-rate", "0.256", "--steps", "4"], 2,
     r"smallest noise multiplier .*ask for ε ≤ [0-9.]+", None),
    ("dpsgd-epsilon-above-floor",
     [*TRAIN, "--method", "dp-sgd", "--norm", "group", "--epsilon", "1e6"], 2,
     r"smallest noise multiplier .*ask for ε ≤ [0-9.]+", None),
]  # fmt: skip


def _fill(argv: list[str], data: Path, tmp: Path) -> list[str]:
    return [a.format(data=data, out=tmp / "run", tmp=tmp) for a in argv]


def _the_line(status: int, out: str, err: str) -> str:
    """The one line of a command: its error line (stderr), or for status 0 the last line
    of stdout."""
    assert "Traceback" not in err, err
    if status == 0:
        return out.strip().splitlines()[-1]
    lines = [line for line in err.strip().splitlines() if line.startswith("labeldp")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize(
    "argv, status, pattern, setup", [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_a_bad_input_is_one_line_and_a_status(
    data_dir, tmp_path, monkeypatch, capsys, argv, status, pattern, setup
):
    if setup is _read_only:
        setup(tmp_path, monkeypatch)
    elif setup is not None:
        setup(tmp_path)
    try:
        code = cli.main(_fill(argv, data_dir, tmp_path))
    except SystemExit as exc:  # argparse
        code = exc.code
    captured = capsys.readouterr()
    line = _the_line(status, captured.out, captured.err)
    assert code == status, captured.err
    assert re.search(pattern, line), line
    assert len(line) <= 700, line  # one readable line (a long message is cut)
    assert not (tmp_path / "run" / "config.json").exists() or status == 0


# ------------------------------------------------------------------ 6: the folder stays usable


@pytest.mark.parametrize(
    "wrong, right",
    [
        (["--method", "dp-sgd", "--epsilon", "50", "--model", "cnn", "--norm", "batch"],
         ["--method", "dp-sgd", "--epsilon", "50", "--model", "cnn", "--norm", "group"]),
        (["--batch-size", "500"], ["--batch-size", "100"]),
    ],
    ids=["dpsgd-norm", "batch-size"],
)  # fmt: skip
def test_a_refused_command_leaves_the_folder_to_the_corrected_one(
    data_dir, tmp_path, capsys, wrong, right
):
    out = tmp_path / "run"
    argv = [a.format(data=data_dir, out=out) for a in TRAIN]
    assert cli.main([*argv, *wrong]) == 2
    assert not (out / "config.json").exists()
    capsys.readouterr()
    assert cli.main([*argv, *right]) == 0, capsys.readouterr().err
    assert (out / "metrics.json").exists()


# ------------------------------------------------------------------ 1: bounded calibration


def test_calibration_for_a_large_epsilon_takes_seconds(monkeypatch):
    # Was 39 s for ε = 50 (the PLD of one step built point by point in Python, ~5-10 µs a
    # point: 6.6 million points over the calibration). Counted, not timed.
    from dp_accounting.pld import privacy_loss_mechanism as mechanism

    points = [0]
    inverse = mechanism.AdditiveNoisePrivacyLoss.inverse_privacy_loss

    def counted(self, privacy_loss):
        points[0] += 1
        return inverse(self, privacy_loss)

    monkeypatch.setattr(mechanism.AdditiveNoisePrivacyLoss, "inverse_privacy_loss", counted)
    sigma = calibrate_dpsgd_noise(50.0, 1e-5, 128 / 500, 4)
    assert points[0] < 2_500_000, points[0]
    assert (1 - 1e-3) * 50 <= dpsgd_epsilon(sigma, 128 / 500, 4, 1e-5) <= 50


def test_replace_one_bound_does_not_overflow_for_a_huge_epsilon():
    # Was an OverflowError after training (math.exp(1000)): the run was lost.
    assert replace_one_bound(1000.0, 1e-5) == (2000.0, 1.0)
    assert replace_one_bound(20.0, 1e-5) == (40.0, 1.0)  # δ′ ≥ 1 is vacuous: capped
    assert replace_one_bound(1.0, 1e-5)[1] < 1


def test_dpsgd_with_a_huge_epsilon_trains_and_records_a_vacuous_replace_bound(
    data_dir, tmp_path, capsys
):
    out = tmp_path / "run"
    argv = [a.format(data=data_dir, out=out) for a in TRAIN]
    assert cli.main([*argv, "--method", "dp-sgd", "--norm", "group", "--epsilon", "1000"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    bound = metrics["ledger"]["entries"][0]["details"]["replace_one_bound"]
    assert bound["delta"] == 1.0 and metrics["epsilon"] <= 1000


# ------------------------------------------------------------------ 2: plan() says what to change


def test_a_calibrated_plan_above_its_budget_does_not_say_omit_noise_multiplier(monkeypatch):
    from labeldp.errors import ConfigError
    from labeldp.methods import dpsgd

    slip = lambda *args, **kwargs: 0.5  # an accountant slip  # noqa: E731
    monkeypatch.setattr(dpsgd, "calibrate_dpsgd_noise", slip)
    with pytest.raises(ConfigError) as caught:
        dpsgd.DPSGDMethod(epsilon=0.01).plan(400, 50, 1)
    assert "omit noise_multiplier" not in str(caught.value)
    assert "ask for a larger epsilon" in str(caught.value)


# ------------------------------------------------------------------ 7, 10: outputs, provenance


def test_audit_canaries_alone_are_recorded(data_dir, tmp_path, capsys):
    # collect_outputs must cope with no memorization canaries (an empty kind).
    out = tmp_path / "run"
    argv = [a.format(data=data_dir, out=out) for a in TRAIN]
    assert cli.main([*argv, "--audit-canaries", "399"]) == 0, capsys.readouterr().err


def test_the_run_records_its_data_folder_and_file_checksums(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main([a.format(data=data_dir, out=out) for a in TRAIN]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert "data" not in metrics  # the MD5s hash the raw labels: a diagnostic
    data = metrics["diagnostics"]["data"]
    assert data["folder"] == str(data_dir.resolve())
    assert sorted(data["md5"]) == sorted(p.name for p in data_dir.iterdir())
    assert all(re.fullmatch(r"[0-9a-f]{32}", md5) for md5 in data["md5"].values())


def test_build_method_names_the_missing_options():
    from labeldp.errors import ConfigError
    from labeldp.methods import build_method

    with pytest.raises(ConfigError, match=r"^method pate-fm needs options: teachers, queries, "):
        build_method("pate-fm", {"epsilon": 1.0})


# ------------------------------------------------------------------ 10: file modes


def test_atomic_writes_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        path = labeldp_io.atomic_write(tmp_path / "f.json", lambda handle: handle.write(b"{}"))
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o640  # mkstemp alone made it 0o600


# ------------------------------------------------------------------ 8, 10: the top-level handler


def test_sigterm_stops_like_ctrl_c_with_status_143(monkeypatch, capsys):
    def terminated(args):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises here
        return 0

    parser = cli.build_parser  # the subcommand's handler is bound at parse time
    monkeypatch.setattr(
        cli,
        "build_parser",
        lambda: _with_handler(parser(), terminated),
    )
    before = signal.getsignal(signal.SIGTERM)
    assert cli.main([*ACCOUNT, "--noise-multiplier", "1", "--sample-rate", "0.1",
                     "--steps", "1"]) == 143  # fmt: skip
    line = _the_line(143, "", capsys.readouterr().err)
    assert re.search(r"terminated \(SIGTERM\); .*--resume to continue", line), line
    assert signal.getsignal(signal.SIGTERM) == before  # put back


def _with_handler(parser, handler):
    original = parser.parse_args

    def parse_args(argv=None):
        args = original(argv)
        args.handler = handler
        return args

    parser.parse_args = parse_args
    return parser


def test_a_store_error_names_the_store(monkeypatch, capsys):
    def broken(args):
        raise sqlite3.DatabaseError("file is not a database")

    monkeypatch.setattr(
        cli, "build_parser", lambda parser=cli.build_parser: _with_handler(parser(), broken)
    )
    argv = ["report", "some.toml", "--store", "results/elsewhere.sqlite"]
    assert cli.main(argv) == 1
    line = _the_line(1, "", capsys.readouterr().err)
    assert "results store results/elsewhere.sqlite cannot be used" in line, line
    assert "file is not a database" in line


@pytest.mark.parametrize("kind", ["folder", "truncated", "not sqlite"])
def test_a_store_that_is_not_a_store_is_one_line(tmp_path, capsys, kind):
    store = tmp_path / "runs.sqlite"
    if kind == "folder":
        store.mkdir()
    elif kind == "truncated":
        source = Path(__file__).resolve().parents[1] / "results" / "runs.sqlite"
        store.write_bytes(source.read_bytes()[:5000])
    else:
        store.write_text("not a database\n" * 100)
    status = cli.main(["report", "fashion_mnist_dpsgd.toml", "--store", str(store)])
    err = capsys.readouterr().err.strip()
    assert status in (1, 2) and len(err.splitlines()) == 1, err
    assert str(store) in err and "Traceback" not in err
