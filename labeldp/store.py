"""The results store: every finished run of every sweep, in one SQLite file.

One row per (sweep, run key); the key is the run's configuration in canonical JSON, so a
rerun of the same sweep finds its finished rows and skips them. A row is written once,
in one transaction, after the run folder holds its metrics (and attack.json), so a crash
or ``kill -9`` at any moment leaves either no row or a complete one: nothing is lost,
nothing is duplicated (a UNIQUE constraint guards the key).

The ``metrics`` and ``attack`` columns hold the JSON forms of the run's
:class:`~labeldp.records.RunRecord` and :class:`~labeldp.records.AttackRecord` (∞ as
"Infinity", see labeldp.records); rows stored by earlier versions keep the forms they were
written in (ε null, ε_LB "inf"), which :meth:`ResultsStore.run_record` and
:meth:`ResultsStore.attack_record` read as well. The ``eps_lb_*`` columns are SQL REALs
(∞ as SQLite's infinity).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .records import AttackRecord, RunRecord

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY,
    sweep TEXT NOT NULL,
    key TEXT NOT NULL,
    name TEXT NOT NULL,
    method TEXT NOT NULL,
    epsilon REAL,
    seed INTEGER NOT NULL,
    test_accuracy REAL NOT NULL,
    eps_lb_memorization REAL,
    eps_lb_one_run REAL,
    label_inference_gap REAL,
    train_seconds REAL,
    run_dir TEXT NOT NULL,
    config TEXT NOT NULL,
    metrics TEXT NOT NULL,
    attack TEXT,
    git_commit TEXT,
    machine TEXT,
    finished_at TEXT NOT NULL,
    numerics TEXT,
    UNIQUE (sweep, key)
);
CREATE TABLE IF NOT EXISTS federated_runs (
    id INTEGER PRIMARY KEY,
    sweep TEXT NOT NULL,
    key TEXT NOT NULL,
    name TEXT NOT NULL,
    variant TEXT NOT NULL,
    algorithm TEXT NOT NULL,
    seed INTEGER NOT NULL,
    label_epsilon REAL,
    final_accuracy REAL NOT NULL,
    virtual_time REAL NOT NULL,
    trips INTEGER NOT NULL,
    server_steps INTEGER NOT NULL,
    train_seconds REAL,
    run_dir TEXT NOT NULL,
    config TEXT NOT NULL,
    record TEXT NOT NULL,
    git_commit TEXT,
    machine TEXT,
    finished_at TEXT NOT NULL,
    UNIQUE (sweep, key)
);
"""


#: The layout of the store. 1: statistics against the true labels live under
#: ``metrics["diagnostics"]`` (see labeldp.run_folder), never beside the results.
#: 2: a ``numerics`` column (JSON of labeldp.provenance.numerics: torch version, thread
#: count, device), NULL for runs made before it was recorded ("unknown").
SCHEMA_VERSION = 2

#: Keys that earlier versions kept in ``metrics["method_details"]`` but that are
#: diagnostics (computed from the raw private labels).
_DIAGNOSTIC_DETAILS = ("label_accuracy_of_answers",)


def _migrate(db: sqlite3.Connection) -> None:
    """Brings a store written by an earlier version to :data:`SCHEMA_VERSION`, in the
    caller's transaction (all rows or none)."""
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version >= SCHEMA_VERSION:
        return
    if version < 1:
        _migrate_to_1(db)
    if version < 2:
        columns = {row[1] for row in db.execute("PRAGMA table_info(runs)")}
        if "numerics" not in columns:
            db.execute("ALTER TABLE runs ADD COLUMN numerics TEXT")
        for row_id, text in db.execute("SELECT id, metrics FROM runs").fetchall():
            settings = json.loads(text).get("numerics")
            if settings:
                db.execute(
                    "UPDATE runs SET numerics = ? WHERE id = ?",
                    (json.dumps(settings, sort_keys=True), row_id),
                )
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def _migrate_to_1(db: sqlite3.Connection) -> None:
    """Version 1: label statistics move under ``metrics["diagnostics"]``."""
    for row_id, text in db.execute("SELECT id, metrics FROM runs").fetchall():
        metrics = json.loads(text)
        details = metrics.get("method_details") or {}
        moved = {k: details.pop(k) for k in _DIAGNOSTIC_DETAILS if k in details}
        if moved or "diagnostics" not in metrics:
            metrics["diagnostics"] = {**metrics.get("diagnostics", {}), **moved}
            db.execute(
                "UPDATE runs SET metrics = ? WHERE id = ?",
                (json.dumps(metrics, sort_keys=True), row_id),
            )


def run_key(config: dict[str, Any]) -> str:
    """Canonical JSON of a run configuration: equal configurations, equal keys."""
    return json.dumps(config, sort_keys=True, separators=(",", ":"))


def _bound(attack: AttackRecord | None, name: str) -> float | None:
    """The ε_LB of the audit ``name`` (math.inf possible), None without it."""
    part = attack.part(name) if attack is not None else None
    return None if not part else float(part["epsilon_lb"])


def _json_text(record: RunRecord | AttackRecord) -> str:
    return json.dumps(record.to_json(), sort_keys=True, allow_nan=False)


class ResultsStore:
    """The runs of all sweeps in the SQLite database at ``path`` (created if absent, unless
    ``create`` is False: then a missing store is a :class:`ConfigError`)."""

    def __init__(self, path: str | Path, create: bool = True) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            raise ConfigError(
                f"the store {self.path} is a folder, not a results store file; pass another --store"
            )
        if not create and not self.path.is_file():
            raise ConfigError(f"the store {self.path} does not exist; run labeldp sweep first")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.executescript(SCHEMA)
            _migrate(db)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=60)
        try:
            db.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
            with db:  # one transaction: committed on success, rolled back on error
                yield db
        finally:
            db.close()

    def finished_keys(self, sweep: str) -> set[str]:
        with self._connect() as db:
            return {row[0] for row in db.execute("SELECT key FROM runs WHERE sweep = ?", (sweep,))}

    def record(
        self,
        sweep: str,
        name: str,
        config: dict[str, Any],
        run_dir: str | Path,
        metrics: RunRecord,
        attack: AttackRecord | None,
        finished_at: str,
    ) -> bool:
        """Stores one finished run (its record, and its attacks' when it was attacked);
        returns False (and changes nothing) when the sweep already holds a run with this
        configuration."""
        options = config.get("method_options", {})
        row = (
            sweep,
            run_key(config),
            name,
            config["method"],
            options.get("epsilon"),
            config["train"]["seed"],
            metrics.evaluation_accuracy,
            _bound(attack, "memorization"),
            _bound(attack, "one_run"),
            attack.label_inference["gap"] if attack else None,
            metrics.train_seconds,
            str(run_dir),
            json.dumps(config, sort_keys=True),
            _json_text(metrics),
            _json_text(attack) if attack else None,
            metrics.git_commit,
            metrics.machine,
            finished_at,
            json.dumps(metrics.numerics, sort_keys=True) if metrics.numerics else None,
        )
        with self._connect() as db:
            cursor = db.execute(
                "INSERT OR IGNORE INTO runs (sweep, key, name, method, epsilon, seed, "
                "test_accuracy, eps_lb_memorization, eps_lb_one_run, label_inference_gap, "
                "train_seconds, run_dir, config, metrics, attack, git_commit, machine, "
                "finished_at, numerics) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                row,
            )
            return cursor.rowcount == 1

    def rows(self, sweep: str) -> list[dict[str, Any]]:
        """Every stored run of ``sweep``, as dicts of the columns, in insertion order."""
        with self._connect() as db:
            db.row_factory = sqlite3.Row
            return [
                dict(r)
                for r in db.execute("SELECT * FROM runs WHERE sweep = ? ORDER BY id", (sweep,))
            ]

    @staticmethod
    def run_record(row: dict[str, Any]) -> RunRecord:
        """The run record of a row of :meth:`rows` (of any version)."""
        return RunRecord.from_json(json.loads(row["metrics"]))

    @staticmethod
    def attack_record(row: dict[str, Any]) -> AttackRecord | None:
        """The attack record of a row of :meth:`rows` (of any version); None when the run
        was not attacked."""
        return AttackRecord.from_json(json.loads(row["attack"])) if row.get("attack") else None

    def finished_federated_keys(self, sweep: str) -> set[str]:
        with self._connect() as db:
            rows = db.execute("SELECT key FROM federated_runs WHERE sweep = ?", (sweep,))
            return {row[0] for row in rows}

    def record_federation(
        self,
        sweep: str,
        name: str,
        variant: str,
        config: dict[str, Any],
        run_dir: str | Path,
        record: Any,
        finished_at: str,
    ) -> bool:
        """Stores one finished federation (a :class:`~labeldp.fl.run.FederationRecord`)
        of a federated sweep; False (nothing changed) when the sweep already holds its
        configuration."""
        summary = record.schedule
        epsilon = record.label_epsilon
        row = (
            sweep, run_key(config), name, variant, record.options["algorithm"], record.seed,
            epsilon if epsilon != float("inf") else None, record.final_accuracy,
            summary["virtual_time"], summary["trips_aggregated"] + summary["trips_dropped"],
            summary["server_steps"], record.train_seconds, str(run_dir),
            json.dumps(config, sort_keys=True),
            json.dumps(record.to_json(), sort_keys=True, allow_nan=False),
            record.provenance.get("git_commit"), record.provenance.get("machine"), finished_at,
        )  # fmt: skip
        with self._connect() as db:
            cursor = db.execute(
                "INSERT OR IGNORE INTO federated_runs (sweep, key, name, variant, algorithm, "
                "seed, label_epsilon, final_accuracy, virtual_time, trips, server_steps, "
                "train_seconds, run_dir, config, record, git_commit, machine, finished_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                row,
            )
            return cursor.rowcount == 1

    def federated_rows(self, sweep: str) -> list[dict[str, Any]]:
        """Every stored federation of ``sweep`` (dicts of the columns, insertion order)."""
        with self._connect() as db:
            db.row_factory = sqlite3.Row
            query = "SELECT * FROM federated_runs WHERE sweep = ? ORDER BY id"
            return [dict(r) for r in db.execute(query, (sweep,))]

    def sweeps(self) -> list[str]:
        with self._connect() as db:
            return [r[0] for r in db.execute("SELECT DISTINCT sweep FROM runs ORDER BY sweep")]
