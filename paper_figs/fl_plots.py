"""Figures of a federated sweep, drawn from the results store.

- ``<sweep>_accuracy.{png,pdf}``: accuracy (test, or validation for a tuning sweep)
  against virtual time (left) and against client trips, the communication (right), one
  colour per grid variant, one thin line per seed; the sweep's target accuracy dotted.
- ``<sweep>_staleness.{png,pdf}``: the staleness histogram of each variant (all seeds'
  aggregated trips; the last bin holds everything larger).
- ``<sweep>_speedup.{png,pdf}`` (when the grid varies ``concurrency``): time to target
  against concurrency (log–log), one line per algorithm, mean over seeds; a seed that
  never reached the target leaves its point out.
- ``<sweep>_price.{png,pdf}`` (with a ``baseline`` and a grid over ``epsilon``): final
  accuracy against the label ε, one line per setting of the other grid keys (mean ± std
  over seeds), the centralized baseline's accuracy at each ε dashed: the price of
  federation under label DP.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from labeldp.fl.report import study_frame  # noqa: E402
from labeldp.fl.run import FederationRecord  # noqa: E402
from labeldp.fl.study import FederatedSweep  # noqa: E402
from paper_figs.plots import _save  # noqa: E402


def _records(store, spec: FederatedSweep) -> dict[str, list[FederationRecord]]:
    wanted = {p.name: p for p in spec.points}
    out: dict[str, list[FederationRecord]] = {}
    for row in store.federated_rows(spec.name):
        point = wanted.get(row["name"])
        if point is None or json.loads(row["config"]) != point.config:
            continue
        out.setdefault(row["variant"], []).append(
            FederationRecord.from_json(json.loads(row["record"]))
        )
    return out


def accuracy_curves(records, spec: FederatedSweep) -> plt.Figure:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    colours = _colours(len(records))
    for i, (variant, runs) in enumerate(records.items()):
        colour = colours[i % len(colours)]
        for j, record in enumerate(runs):
            for ax, axis in zip(axes, ("virtual_time", "trips"), strict=True):
                x = [h[axis] for h in record.history]
                y = [100 * h["accuracy"] for h in record.history]
                ax.plot(x, y, color=colour, lw=1, alpha=0.8, label=variant if j == 0 else None)
    for ax, label in zip(axes, ("virtual time (mean trip durations)", "client trips"), strict=True):
        ax.axhline(100 * spec.target_accuracy, color="grey", ls=":", lw=1)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    splits = {r.evaluation_split for runs in records.values() for r in runs}
    axes[0].set_ylabel(f"{' / '.join(sorted(splits))} accuracy (%)")
    axes[1].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"{spec.name}: accuracy vs time and vs communication")
    fig.tight_layout()
    return fig


def _colours(n: int) -> list:
    """n colours, distinct up to 20 (the default cycle up to its 10, then tab20)."""
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    if n > len(colours):
        colours = [plt.get_cmap("tab20")(i % 20) for i in range(n)]
    return colours


def staleness_histograms(records, spec: FederatedSweep) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(7, 4.2))
    colours = _colours(len(records))
    for i, (variant, runs) in enumerate(records.items()):
        counts = np.sum([r.schedule["staleness_histogram"] for r in runs], axis=0)
        if counts.sum() == 0:
            continue
        share = counts / counts.sum()
        ax.step(np.arange(len(share)), share, where="mid", label=variant,
                color=colours[i % len(colours)])  # fmt: skip
    ax.set_xlabel("staleness τ (server steps; last bin: all larger)")
    ax.set_ylabel("share of aggregated trips")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    ax.set_title(f"{spec.name}: staleness")
    fig.tight_layout()
    return fig


def speedup(frame, spec: FederatedSweep) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for algorithm, g in frame.groupby("algorithm", sort=False):
        points = []
        for c, h in g.groupby("concurrency"):
            times = h["time_to_target"].to_numpy(dtype=float)
            if np.isfinite(times).all():
                points.append((c, times.mean()))
        if points:
            xs, ys = zip(*sorted(points), strict=True)
            ax.plot(xs, ys, marker="o", label=algorithm)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("concurrency (clients training at once)")
    ax.set_ylabel(f"virtual time to {100 * spec.target_accuracy:g} % accuracy")
    ax.legend()
    ax.grid(alpha=0.3, which="both")
    ax.set_title(f"{spec.name}: time to target vs concurrency")
    fig.tight_layout()
    return fig


def price_of_federation(store, frame, spec: FederatedSweep) -> plt.Figure | None:
    """Final accuracy against the label ε beside the centralized baseline (None without
    a baseline or an ε grid)."""
    if spec.baseline is None or "epsilon" not in spec.grid:
        return None
    from labeldp.report import summary
    from labeldp.sweep import SweepSpec

    central = summary(store, SweepSpec.load(spec.path.parent / spec.baseline))
    epsilons = sorted({float(e) for e in frame["label_epsilon"]})
    position = {e: i for i, e in enumerate(epsilons)}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    others = [k for k in spec.grid if k != "epsilon"]
    groups = frame.groupby(others, sort=False) if others else [((), frame)]
    for key, g in groups:
        key = key if isinstance(key, tuple) else (key,)
        stats = g.groupby("label_epsilon")["final_accuracy"].agg(["mean", "std"])
        xs = [position[float(e)] for e in stats.index]
        label = ", ".join(f"{k} {v}" for k, v in zip(others, key, strict=True)) or "federated"
        ax.errorbar(xs, 100 * stats["mean"], yerr=100 * stats["std"].fillna(0), marker="o",
                    capsize=3, label=label)  # fmt: skip
    if not central.empty:
        points = sorted(
            (position[e], 100 * row.accuracy_mean)
            for row in central.itertuples()
            for e in [np.inf if np.isnan(row.epsilon) else float(row.epsilon)]
            if e in position
        )
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, "k--", marker="s", label=f"centralized ({spec.baseline})")
    ax.set_xticks(range(len(epsilons)), ["∞" if np.isinf(e) else f"{e:g}" for e in epsilons])
    ax.set_xlabel("label ε (replace one label; ∞: no label DP)")
    ax.set_ylabel("final test accuracy (%)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    ax.set_title(f"{spec.name}: the price of federation under label DP")
    fig.tight_layout()
    return fig


def write_study_figures(
    store, spec: FederatedSweep, out_dir: str | Path = "paper_figs"
) -> list[Path]:
    """Draws the federated sweep's figures (PNG and PDF) into ``out_dir``."""
    records = _records(store, spec)
    if not records:
        return []
    figures = {
        "accuracy": accuracy_curves(records, spec),
        "staleness": staleness_histograms(records, spec),
    }
    if "concurrency" in spec.grid:
        figures["speedup"] = speedup(study_frame(store, spec), spec)
    price = price_of_federation(store, study_frame(store, spec), spec)
    if price is not None:
        figures["price"] = price
    paths = []
    for kind, fig in figures.items():
        for suffix in (".png", ".pdf"):
            paths.append(_save(fig, Path(out_dir) / f"{spec.name}_{kind}{suffix}"))
        plt.close(fig)
    return paths
