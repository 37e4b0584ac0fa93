"""The "PATE-FM diagnostics (outside the guarantee)" section of a sweep report.

Reads what every pate-fm run records under ``metrics.json["diagnostics"]`` (see
:mod:`labeldp.methods.pate_fm`: statistics computed from the raw teacher votes and the
labels the run trains on, not covered by its ε) and tabulates it per ε, the mean over
seeds. Rows made before a diagnostic was recorded show "–" for it.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pandas as pd

from .errors import ConfigError

DASH = "–"

#: The columns :func:`pate_diagnostics_section` needs in its ``rows``.
REQUIRED_COLUMNS = ("method", "epsilon", "seed", "metrics")


def _number(value: Any) -> float | None:
    """``value`` as a finite float, else None (missing, null, NaN, not a number)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _facts(metrics: dict[str, Any]) -> dict[str, Any]:
    """One run's figures (fractions in [0, 1], counts), None where not recorded."""
    diagnostics = metrics.get("diagnostics") or {}
    details = metrics.get("method_details") or {}
    options = metrics.get("method_options") or {}
    split = metrics.get("evaluation_split", "test")
    student = metrics.get("validation_accuracy" if split == "validation" else "test_accuracy")
    histogram = diagnostics.get("answer_histogram")
    return {
        # counts: the diagnostics, else what earlier runs recorded elsewhere
        "answered": _number(diagnostics.get("queries_answered", details.get("answered"))),
        "considered": _number(diagnostics.get("queries_considered", details.get("considered"))),
        "pool": _number(diagnostics.get("queries_pool", options.get("queries"))),
        "answer_rate": _number(diagnostics.get("answer_rate")),
        "answer_rate_pool": _number(diagnostics.get("answer_rate_pool")),
        "label_accuracy": _number(diagnostics.get("label_accuracy_of_answers")),
        "ensemble_accuracy": _number(diagnostics.get("ensemble_accuracy_pool")),
        "teacher_mean": _number(diagnostics.get("teacher_accuracy_mean")),
        "teacher_min": _number(diagnostics.get("teacher_accuracy_min")),
        "teacher_max": _number(diagnostics.get("teacher_accuracy_max")),
        "ceiling": _number(diagnostics.get("ceiling_student_accuracy")),
        "student": _number(student),
        "histogram": [float(c) for c in histogram] if isinstance(histogram, list) else None,
    }


def _mean(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def _mean_histogram(histograms: list[list[float] | None]) -> list[float] | None:
    known = [h for h in histograms if h is not None]
    if not known or len({len(h) for h in known}) != 1:
        return None
    return np.mean(np.asarray(known, dtype=np.float64), axis=0).tolist()


def _percent(value: float | None) -> str:
    return DASH if value is None else f"{100 * value:.2f}"


def _count(value: float | None) -> str:
    if value is None:
        return DASH
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.1f}"


def pate_diagnostics_section(rows: pd.DataFrame) -> list[str]:
    """Markdown lines of the "PATE-FM diagnostics (outside the guarantee)" section.

    rows: a sweep's store rows, at least the columns ``method``, ``epsilon`` (the budget),
    ``seed`` and ``metrics`` (the JSON text of a run's metrics.json); a ``variant`` column,
    when it holds more than one value, splits the rows per variant too. Only the pate-fm
    rows are read; without any the section is empty ([]).

    One table row per ε (per variant and ε), the mean over its seeds of: answered /
    considered / pool (query counts), the answer rate (answered / considered, in %),
    the accuracy of the answered labels, the noiseless ensemble's accuracy on the pool
    (plurality of the raw votes), the teachers' mean accuracy (mean of their min and max)
    on the evaluation split, the ceiling student's and the student's accuracy on the
    evaluation split (accuracies in %), and the answers' class histogram (counts per
    class). A figure a run did not record is left out of the mean; "–" when no seed has it.
    """
    missing = [c for c in REQUIRED_COLUMNS if c not in rows.columns]
    if missing:
        raise ConfigError(f"rows must have the columns {', '.join(missing)} (missing)")
    pate = rows[rows["method"] == "pate-fm"]
    if pate.empty:
        return []
    by_variant = "variant" in pate.columns and pate["variant"].nunique(dropna=False) > 1
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for row in pate.itertuples(index=False):
        text = row.metrics
        metrics = json.loads(text) if isinstance(text, (str, bytes)) else dict(text or {})
        variant = str(getattr(row, "variant", "")) if by_variant else ""
        epsilon = _number(row.epsilon)
        key = (variant, math.inf if epsilon is None else epsilon)
        groups.setdefault(key, []).append(_facts(metrics))
    lines = [
        "",
        "## PATE-FM diagnostics (outside the guarantee)",
        "",
        "Computed from the raw teacher votes and the true labels (a canary's original "
        "label, not the planted one the teachers saw); not covered by the runs' ε, not a "
        "release. Mean over seeds. Answered / considered / pool: queries answered, "
        "considered before the privacy filter stopped, and in the pool; answer rate: "
        "answered / considered. Noiseless ensemble: plurality of the raw votes (no noise) "
        "on the whole pool. Teachers: mean (min–max) accuracy on the evaluation split. "
        "Ceiling student: the student's recipe trained on the true labels of the answered "
        "queries. Accuracies in %; histogram: answers per class. –: not recorded.",
        "",
    ]
    head = "| variant | ε |" if by_variant else "| ε |"
    columns = (
        " seeds | answered / considered / pool | answer rate (%) | answered-label "
        "accuracy | noiseless ensemble accuracy (pool) | teacher accuracy mean (min–max) | "
        "ceiling student | student | answer histogram |"
    )
    lines.append(head + columns)
    lines.append("|" + "---|" * (head.count("|") - 1 + columns.count("|")))
    for (variant, epsilon), facts in sorted(groups.items()):
        mean = {k: _mean([f[k] for f in facts]) for k in facts[0] if k != "histogram"}
        histogram = _mean_histogram([f["histogram"] for f in facts])
        counts = " / ".join(_count(mean[k]) for k in ("answered", "considered", "pool"))
        teachers = _percent(mean["teacher_mean"])
        if mean["teacher_min"] is not None and mean["teacher_max"] is not None:
            teachers += f" ({_percent(mean['teacher_min'])}–{_percent(mean['teacher_max'])})"
        cells = [
            "∞" if math.isinf(epsilon) else f"{epsilon:g}",
            str(len(facts)),
            counts,
            _percent(mean["answer_rate"]),
            _percent(mean["label_accuracy"]),
            _percent(mean["ensemble_accuracy"]),
            teachers,
            _percent(mean["ceiling"]),
            _percent(mean["student"]),
            DASH if histogram is None else "[" + ", ".join(_count(c) for c in histogram) + "]",
        ]
        if by_variant:
            cells.insert(0, variant)
        lines.append("| " + " | ".join(cells) + " |")
    return lines
