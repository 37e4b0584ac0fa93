"""Result tables of a sweep, from the store: results/<sweep>.md and results/<sweep>.csv.

Accuracy is the mean ± sample standard deviation over seeds (in %), per method and ε;
ε_LB columns give the mean over seeds of each audit's lower bound. The Markdown file
starts with how to regenerate it and the commits, machines and dates of its runs; the
published numbers of the paper a sweep mirrors are printed beside ours.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from .io import atomic_write_text
from .methods import METHODS
from .provenance import provenance
from .runner import DEFAULT_MODEL
from .store import ResultsStore, run_key
from .sweep import SweepSpec


def grid_rows(store: ResultsStore, spec: SweepSpec) -> pd.DataFrame:
    """The stored runs of ``spec`` whose configuration is in its current grid (rows left
    by an earlier version of the sweep file are not counted)."""
    keys = {run_key(config.to_dict()) for _, config in spec.runs()}
    rows = pd.DataFrame([r for r in store.rows(spec.name) if r["key"] in keys])
    return rows


def summary(store: ResultsStore, spec: SweepSpec) -> pd.DataFrame:
    """One row per (method, ε): accuracy mean/std/count over seeds (fractions 0–1), mean
    ε_LB of each audit, mean label-inference gap. ε is NaN for the non-private rows."""
    rows = grid_rows(store, spec)
    if rows.empty:
        return rows
    rows["epsilon"] = rows["epsilon"].astype(float)
    grouped = rows.groupby(["method", "epsilon"], dropna=False, sort=False)
    table = grouped.agg(
        accuracy_mean=("test_accuracy", "mean"),
        accuracy_std=("test_accuracy", "std"),
        seeds=("seed", "nunique"),
        eps_lb_memorization=("eps_lb_memorization", "mean"),
        eps_lb_one_run=("eps_lb_one_run", "mean"),
        label_inference_gap=("label_inference_gap", "mean"),
        train_seconds=("train_seconds", "mean"),
    ).reset_index()
    order = {m: i for i, m in enumerate(["none", *spec.methods])}
    table["order"] = table["method"].map(order).fillna(len(order))
    return table.sort_values(["order", "epsilon"]).drop(columns="order").reset_index(drop=True)


def _accuracy(mean: float, std: float, seeds: int, of: int = 1) -> str:
    """mean ± std in %, with "(k of n seeds)" when only k of the sweep's n seeds ran."""
    text = (
        f"{100 * mean:.2f} ± {100 * std:.2f}"
        if seeds > 1 and not math.isnan(std)
        else f"{100 * mean:.2f}"
    )
    return text if seeds >= of else f"{text} ({seeds} of {of} seeds)"


def _bound(value: float) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return "∞" if math.isinf(value) else f"{value:.2f}"


def write_report(
    store: ResultsStore, spec: SweepSpec, sweep_file: str | Path, out_dir: str | Path = "results"
) -> tuple[Path, Path]:
    """Writes results/<sweep>.md and .csv (atomically) and returns their paths."""
    out_dir = Path(out_dir)
    table = summary(store, spec)
    csv_path, md_path = out_dir / f"{spec.name}.csv", out_dir / f"{spec.name}.md"
    atomic_write_text(csv_path, table.to_csv(index=False))
    runs = grid_rows(store, spec)
    now = provenance()
    lines = [f"# {spec.name}", ""]
    if spec.description:
        lines += [spec.description, ""]
    if runs.empty:
        lines.append("No finished runs in the store yet.")
    else:
        commits = ", ".join(sorted(set(runs["git_commit"].fillna("?"))))
        machines = "; ".join(sorted(set(runs["machine"].fillna("?"))))
        lines += [
            f"- made by: `labeldp sweep {sweep_file}` then `labeldp report {sweep_file}` "
            f"(or `labeldp reproduce`)",
            f"- runs: {len(runs)} of {len(spec.runs())} in the grid, at commits {commits}",
            f"- machines: {machines}",
            f"- runs finished {runs['finished_at'].min()} to {runs['finished_at'].max()}; "
            f"report written {now['date']} at commit {now['git_commit']}",
            f"- {spec.dataset}, model {spec.run.get('model') or DEFAULT_MODEL[spec.dataset]}, "
            f"seeds {spec.seeds}, training {spec.train}, "
            f"train size {spec.run.get('train_size') or 'all'}, "
            f"canaries {spec.run.get('canaries', 0)}, "
            f"audit canaries {spec.run.get('audit_canaries', 0)}",
            *(
                [f"- per-method settings (replacing the shared ones): {spec.per_method}"]
                if spec.per_method
                else []
            ),
            "",
            "## Test accuracy (%)" + (" — mean ± std over seeds" if len(spec.seeds) > 1 else ""),
            "",
        ]
        eps_grid = spec.all_epsilons
        lines.append("| method | " + " | ".join(f"ε={e:g}" for e in eps_grid) + " |")
        lines.append("|---" * (len(eps_grid) + 1) + "|")
        for method in spec.methods:
            cells = []
            for e in eps_grid:
                hit = table[(table["method"] == method) & (table["epsilon"] == e)]
                cells.append(
                    "–"
                    if hit.empty
                    else _accuracy(
                        *hit.iloc[0][["accuracy_mean", "accuracy_std", "seeds"]], len(spec.seeds)
                    )
                )
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        none = table[table["method"] == "none"]
        if not none.empty:
            r = none.iloc[0]
            lines.append(
                f"| none (ε = ∞) | "
                f"{_accuracy(r.accuracy_mean, r.accuracy_std, r.seeds, len(spec.seeds))} |"
                + " |"
                * (len(eps_grid) - 1)
            )
        for method in spec.methods:
            meaning = getattr(METHODS.get(method), "epsilon_meaning", None)
            if meaning:
                lines += ["", f"{method}: {meaning}"]
        if spec.reference:
            ref = spec.reference
            lines += ["", f"Published ({ref['source']}):", ""]
            ref_eps = [float(e) for e in ref["epsilons"]]
            lines.append("| method | " + " | ".join(f"ε={e:g}" for e in ref_eps) + " |")
            lines.append("|---" * (len(ref_eps) + 1) + "|")
            for method, values in ref["rows"].items():
                lines.append(
                    f"| {method} | "
                    + " | ".join("–" if v is None else f"{v:g}" for v in values)
                    + " |"
                )
        if spec.audited:
            lines += [
                "",
                "## What the runs leak (mean over seeds)",
                "",
                "ε_LB at α = 0.05: memorization attack (threshold chosen on half the canaries, "
                "bound on the other half) and one-run audit (Bonferroni over 5 guess counts). "
                "Label-inference gap: attack accuracy on training labels minus on held-out labels. "
                "Each bound is valid at level α on its own; across the many runs of a sweep a few "
                "false alarms (ε_LB > ε) are expected at that level, so treat a single one as a "
                "prompt to rerun with more canaries, and several as a bug.",
                "",
                "| method | ε | ε_LB memorization | ε_LB one-run | label-inference gap |",
                "|---|---|---|---|---|",
            ]
            for r in table.itertuples():
                eps = "∞" if math.isnan(r.epsilon) else f"{r.epsilon:g}"
                lines.append(
                    f"| {r.method} | {eps} | {_bound(r.eps_lb_memorization)} | "
                    f"{_bound(r.eps_lb_one_run)} | {r.label_inference_gap:+.4f} |"
                )
    atomic_write_text(md_path, "\n".join(lines) + "\n")
    return md_path, csv_path
