"""The results store migrates earlier layouts: statistics against the true labels move
under ``metrics["diagnostics"]`` (audit item 4), once, in one transaction."""

from __future__ import annotations

import json
import sqlite3

from labeldp.store import SCHEMA, SCHEMA_VERSION, ResultsStore


def test_an_old_store_moves_label_statistics_under_diagnostics(tmp_path):
    path = tmp_path / "runs.sqlite"
    db = sqlite3.connect(path)
    db.executescript(SCHEMA)
    old = {
        "test_accuracy": 0.5,
        "method_details": {"answered": 3, "label_accuracy_of_answers": 0.9},
    }
    db.execute(
        "INSERT INTO runs (sweep, key, name, method, seed, test_accuracy, run_dir, config, "
        "metrics, finished_at) VALUES ('s', 'k', 'n', 'pate-fm', 0, 0.5, 'r', '{}', ?, 'now')",
        (json.dumps(old),),
    )
    db.commit()
    db.close()
    (row,) = ResultsStore(path).rows("s")
    metrics = json.loads(row["metrics"])
    assert metrics["method_details"] == {"answered": 3}
    assert metrics["diagnostics"] == {"label_accuracy_of_answers": 0.9}
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    ResultsStore(path)  # a second open changes nothing
    assert json.loads(ResultsStore(path).rows("s")[0]["metrics"]) == metrics
