"""Figures of a sweep, drawn from the results store.

- ``<sweep>_utility.{png,pdf}``: privacy–utility curves, test accuracy against ε (log
  scale), one line per method with error bars over seeds (± one standard deviation), the
  non-private level as a dashed line.
- ``<sweep>_audit.{png,pdf}``: ε_LB of each audit (mean over seeds) against the claimed
  ε, with the bound each point is tested against (ε_LB = ε for label-DP methods, 2ε for
  DP-SGD's add/remove ε: a point above its line would be a privacy bug) and the most each
  audit's canaries can certify (a hollow marker: ε at or above it, so that audit cannot
  fail there).

Stale runs (pate-fm made under the withdrawn stopping rule) are drawn dashed and say so in
the legend.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from labeldp.io import atomic_write  # noqa: E402
from labeldp.report import summary  # noqa: E402
from labeldp.store import ResultsStore  # noqa: E402
from labeldp.sweep import SweepSpec  # noqa: E402

STALE_LEGEND = "stale: withdrawn stopping rule, rerun pending"


def _stale(table: pd.DataFrame, method: str) -> bool:
    return bool(table.loc[table["method"] == method, "stale_seeds"].sum())


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
            linestyle="--" if _stale(table, method) else "-",
            label=(
                method
                if part["seeds"].min() >= len(spec.seeds)
                else f"{method} ({int(part['seeds'].min())} of {len(spec.seeds)} seeds)"
            )
            + (f"\n({STALE_LEGEND})" if _stale(table, method) else ""),
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
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


def audit(table: pd.DataFrame, spec: SweepSpec) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(8, 4.5))
    private = table[table["method"] != "none"]
    top = max([float(e) for e in spec.all_epsilons] + [0.0])
    markers = {"eps_lb_memorization": "o", "eps_lb_one_run": "s"}
    names = {"eps_lb_memorization": "memorization", "eps_lb_one_run": "one-run"}
    caps = {c: table[f"{c}_max"].dropna() for c in markers}
    caps = {c: float(v.max()) for c, v in caps.items() if len(v)}
    cap_values = list(caps.values())
    y_top = 1.08 * max([top, *cap_values, *(private[c].max() for c in markers), 0.5])
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    handles = []
    for i, method in enumerate(spec.methods):
        part = private[private["method"] == method].sort_values("epsilon")
        if part.empty:
            continue
        color, stale = colors[i % len(colors)], _stale(table, method)
        style = "--" if stale else "-"
        for column, marker in markers.items():
            if part[column].isna().all():
                continue
            ax.plot(part["epsilon"], part[column], marker=marker, color=color, linestyle=style)
            cannot = part[part[column.replace("eps_lb_", "") + "_cannot_fail"]]
            ax.plot(
                cannot["epsilon"],
                cannot[column],
                marker=marker,
                linestyle="none",
                color=color,
                markerfacecolor="white",
                zorder=3,
            )
        handles.append(
            Line2D(
                [],
                [],
                color=color,
                linestyle=style,
                label=f"{method} ({STALE_LEGEND})" if stale else method,
            )
        )
    for column, marker in markers.items():
        handles.append(
            Line2D([], [], color="dimgrey", marker=marker, linestyle="none", label=names[column])
        )
    if any(private[c.replace("eps_lb_", "") + "_cannot_fail"].any() for c in markers):
        handles.append(
            Line2D(
                [],
                [],
                color="dimgrey",
                marker="o",
                markerfacecolor="white",
                linestyle="none",
                label="ε above what the canaries can certify:\nthe audit cannot fail",
            )
        )
    handles.append(ax.plot([0, top], [0, top], color="black", linestyle="--", linewidth=1)[0])
    handles[-1].set_label("ε_LB = ε (label DP: replace one label)")
    if "dp-sgd" in set(private["method"]):
        handles.append(
            ax.plot([0, top], [0, 2 * top], color="black", linestyle="-.", linewidth=1)[0]
        )
        handles[-1].set_label("ε_LB = 2ε (dp-sgd: a label change\nunder add/remove one example)")
    for column, cap in caps.items():
        ax.axhline(cap, color="firebrick", linestyle="-", linewidth=0.8, alpha=0.6)
        ax.annotate(
            f"max certifiable, {names[column]}: {cap:.2f}",
            (1, cap),
            xycoords=("axes fraction", "data"),
            fontsize=7,
            ha="right",
            va="bottom" if cap == max(cap_values) else "top",
            xytext=(-2, 2 if cap == max(cap_values) else -2),
            textcoords="offset points",
            color="firebrick",
        )
    none = table[table["method"] == "none"]
    levels = {}
    for column in markers:
        if not none.empty and not math.isnan(none.iloc[0][column]):
            levels[column] = float(none.iloc[0][column])
            ax.axhline(levels[column], color="grey", linestyle=":", linewidth=1)
    if levels and max(levels.values()) - min(levels.values()) < 0.06 * y_top:
        # Close lines share one label, above the higher.
        text = ", ".join(f"{names[c]} {v:.2f}" for c, v in levels.items())
        levels = {"both": max(levels.values())}
        texts = {"both": f"non-private: {text}"}
    else:
        texts = {c: f"non-private, {names[c]}: {v:.2f}" for c, v in levels.items()}
    for key, value in levels.items():
        ax.annotate(
            texts[key],
            (0, value),
            xycoords=("axes fraction", "data"),
            fontsize=7,
            xytext=(2, 2),
            textcoords="offset points",
            color="grey",
        )
    ax.set_xlim(0, top * 1.04)
    ax.set_ylim(0, y_top)
    ax.set_xlabel("claimed ε")
    seeds = " (mean over seeds)" if len(spec.seeds) > 1 else ""
    ax.set_ylabel(f"ε lower bound (α = 0.05){seeds}")
    ax.set_title(f"{spec.dataset}: what the runs leak")
    ax.grid(alpha=0.3)
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
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
