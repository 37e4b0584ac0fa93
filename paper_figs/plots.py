"""Figures of a sweep, drawn from the results store.

- ``<sweep>_utility.{png,pdf}``: privacy–utility curves, test accuracy against ε (log
  scale), one line per method with error bars over seeds (± one standard deviation), the
  non-private level as a dashed line.
- ``<sweep>_audit.{png,pdf}``: ε_LB of each audit against the claimed ε, with the
  diagonal ε_LB = ε (a point above it would be a privacy bug).
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from labeldp.io import atomic_write  # noqa: E402
from labeldp.report import summary  # noqa: E402
from labeldp.store import ResultsStore  # noqa: E402
from labeldp.sweep import SweepSpec  # noqa: E402


def privacy_utility(table: pd.DataFrame, spec: SweepSpec) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for method in spec.methods:
        part = table[table["method"] == method].sort_values("epsilon")
        if part.empty:
            continue
        ax.errorbar(
            part["epsilon"],
            100 * part["accuracy_mean"],
            yerr=100 * part["accuracy_std"].fillna(0),
            marker="o",
            capsize=3,
            label=method
            if part["seeds"].min() >= len(spec.seeds)
            else f"{method} ({int(part['seeds'].min())} of {len(spec.seeds)} seeds)",
        )
    none = table[table["method"] == "none"]
    if not none.empty:
        ax.axhline(
            100 * none.iloc[0]["accuracy_mean"],
            color="black",
            linestyle="--",
            linewidth=1,
            label="non-private",
        )
    ax.set_xscale("log")
    ticks = spec.all_epsilons
    ax.set_xticks(ticks, [f"{e:g}" for e in ticks])
    ax.minorticks_off()
    dp_sgd = "; dp-sgd: add/remove one example" if "dp-sgd" in spec.methods else ""
    ax.set_xlabel(f"ε (label DP{dp_sgd})")
    ax.set_ylabel("test accuracy (%)")
    seeds = f"{len(spec.seeds)} seed{'s' if len(spec.seeds) > 1 else ''}"
    ax.set_title(f"{spec.dataset}: privacy–utility ({seeds})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def audit(table: pd.DataFrame, spec: SweepSpec) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(5.5, 4))
    private = table[table["method"] != "none"]
    top = max([float(e) for e in spec.epsilons] + [0.0])
    markers = {"eps_lb_memorization": "o", "eps_lb_one_run": "s"}
    names = {"eps_lb_memorization": "memorization", "eps_lb_one_run": "one-run"}
    for method in spec.methods:
        part = private[private["method"] == method].sort_values("epsilon")
        for column, marker in markers.items():
            if part.empty or part[column].isna().all():
                continue
            ax.plot(
                part["epsilon"], part[column], marker=marker, label=f"{method} ({names[column]})"
            )
    ax.plot([0, top], [0, top], color="black", linestyle="--", linewidth=1, label="ε_LB = ε")
    none = table[table["method"] == "none"]
    for column in markers:
        if not none.empty and not math.isnan(none.iloc[0][column]):
            ax.axhline(none.iloc[0][column], color="grey", linestyle=":", linewidth=1)
            ax.annotate(
                f"non-private, {names[column]}",
                (0, none.iloc[0][column]),
                fontsize=7,
                xytext=(2, 2),
                textcoords="offset points",
                color="grey",
            )
    ax.set_xlabel("claimed ε")
    ax.set_ylabel("ε lower bound (α = 0.05)")
    ax.set_title(f"{spec.dataset}: what the runs leak")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _save(fig: plt.Figure, path: Path) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format=path.suffix[1:], dpi=150)
    atomic_write(path, lambda handle: handle.write(buffer.getvalue()))
    return path


def write_figures(
    store: ResultsStore, spec: SweepSpec, out_dir: str | Path = "paper_figs"
) -> list[Path]:
    """Draws the sweep's figures as PNG and PDF into ``out_dir``; returns the paths."""
    out_dir = Path(out_dir)
    table = summary(store, spec)
    if table.empty:
        return []
    figures = {"utility": privacy_utility(table, spec)}
    if spec.audited:
        figures["audit"] = audit(table, spec)
    paths = []
    for kind, fig in figures.items():
        for suffix in (".png", ".pdf"):
            paths.append(_save(fig, out_dir / f"{spec.name}_{kind}{suffix}"))
        plt.close(fig)
    return paths
