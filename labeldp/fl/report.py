"""Tables of a federated sweep: results/<sweep>.md and .csv from the store.

Per grid variant (mean ± std over its seeds): final accuracy (on the test split, or on
the validation split for a tuning sweep: ``validation_size``, said in the header), time-, trips- and
server-steps-to-target (the first crossing of the sweep's ``target_accuracy`` by the
best-so-far accuracy, interpolated; a seed that never reaches it counts as ∞ and the
column says how many reached it), staleness mean and p99, achieved concurrency, dropped
trips, the label ε (and, when a run of the sweep planted canaries, the mean ε_LB of the
memorization attack and of the one-run audit on the final global model, each tested
against that label ε: see labeldp.fl.run) and the wall time. When the grid varies the
algorithm, a second table gives each algorithm's time- and trips-to-target divided by
those of the reference algorithm (the sweep's ``reference``, default fedbuff) at the same
other grid values: the speed-up factors the FedBuff and Papaya papers report. With a
``baseline`` (a centralized sweep file next to the federated one, e.g. RR on all the data
in one place at the same ε), a third table sets each variant's final accuracy beside the
baseline's at the same label ε and gives the difference: the price of federation.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..errors import ConfigError
from ..io import atomic_write_text
from .run import FederationRecord, time_to_target
from .study import FederatedSweep

AXES = (("virtual_time", "time"), ("trips", "trips"), ("server_steps", "steps"))


def study_frame(store: Any, spec: FederatedSweep) -> pd.DataFrame:
    """One row per stored federation of the sweep's current grid, with its summaries."""
    wanted = {p.name: p for p in spec.points}
    # the grid's order (variant by variant as the file lists them), not the order of running
    order = {v: i for i, v in enumerate(dict.fromkeys(p.variant for p in spec.points))}
    rows = []
    for row in store.federated_rows(spec.name):
        point = wanted.get(row["name"])
        if point is None or json.loads(row["config"]) != point.config:
            continue  # a point of an earlier grid
        record = FederationRecord.from_json(json.loads(row["record"]))
        out = {
            "variant": row["variant"], "seed": row["seed"], "algorithm": row["algorithm"],
            "evaluation_split": record.evaluation_split,
            "final_accuracy": record.final_accuracy,
            "best_accuracy": max(h["accuracy"] for h in record.history),
            "staleness_mean": record.schedule["staleness"]["mean"],
            "staleness_p99": record.schedule["staleness"]["p99"],
            "achieved_concurrency": record.schedule["mean_concurrency"],
            "dropped": record.schedule["trips_dropped"],
            "label_epsilon": record.label_epsilon, "seconds": record.train_seconds,
            **({f"epsilon_lb_{name}": math.nan if lb is None else lb
                for name, lb in record.epsilon_lb.items()} if record.attack else {}),
            "git_commit": row["git_commit"], "machine": row["machine"],
            **{k: point.options.to_dict()[k] for k in spec.grid},
        }  # fmt: skip
        for axis, short in AXES:
            out[f"{short}_to_target"] = time_to_target(record.history, spec.target_accuracy, axis)
        rows.append(out)
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    rank = frame["variant"].map(order)
    return frame.assign(_rank=rank).sort_values(["_rank", "seed"], kind="stable").drop(
        columns="_rank"
    ).reset_index(drop=True)


def _mean_std(values: pd.Series, digits: int = 1, scale: float = 1.0) -> str:
    v = values.to_numpy(dtype=float) * scale
    if np.isinf(v).any():
        reached = int(np.isfinite(v).sum())
        return f"∞ ({reached}/{len(v)} reached)"
    if len(v) == 1:
        return f"{v[0]:.{digits}f}"
    return f"{v.mean():.{digits}f} ± {v.std(ddof=1):.{digits}f}"


#: The audits whose mean ε_LB the summary shows (when a run of the sweep has them).
AUDIT_COLUMNS = (("memorization", "ε_LB memorization"), ("one_run", "ε_LB one-run"))


def _mean_lb(values: pd.Series) -> str:
    """The mean ε_LB over the seeds that ran the audit ("–" for none; "(n/m)" when only
    some did)."""
    v = values.to_numpy(dtype=float)
    have = v[~np.isnan(v)]
    if not len(have):
        return "–"
    return f"{have.mean():.2f}" + (f" ({len(have)}/{len(v)})" if len(have) < len(v) else "")


def summary_table(frame: pd.DataFrame, spec: FederatedSweep) -> list[str]:
    target = f"{100 * spec.target_accuracy:g} %"
    audits = [
        (name, title) for name, title in AUDIT_COLUMNS
        if f"epsilon_lb_{name}" in frame and frame[f"epsilon_lb_{name}"].notna().any()
    ]  # fmt: skip
    lines = [
        f"| variant | seeds | final acc. (%) | time to {target} | trips to {target} | "
        f"steps to {target} | staleness mean / p99 | concurrency | dropped trips | "
        f"label ε | {''.join(f'{title} | ' for _, title in audits)}wall s |",
        "|---|---|---|---|---|---|---|---|---|---|" + "---|" * len(audits) + "---|",
    ]
    for variant, g in frame.groupby("variant", sort=False):
        eps = g["label_epsilon"].iloc[0]
        lbs = "".join(f"{_mean_lb(g[f'epsilon_lb_{name}'])} | " for name, _ in audits)
        lines.append(
            f"| {variant} | {len(g)} | {_mean_std(g['final_accuracy'], 2, 100)} | "
            f"{_mean_std(g['time_to_target'], 1)} | {_mean_std(g['trips_to_target'], 0)} | "
            f"{_mean_std(g['steps_to_target'], 0)} | {g['staleness_mean'].mean():.2f} / "
            f"{g['staleness_p99'].mean():.0f} | {g['achieved_concurrency'].mean():.0f} | "
            f"{g['dropped'].mean():.0f} | {'∞' if math.isinf(eps) else f'{eps:g}'} | "
            f"{lbs}{g['seconds'].mean():.0f} |"
        )
    if audits:
        lines += [
            "",
            "ε_LB: mean over seeds of each audit's lower bound (α = 0.05) on the final "
            "global model, tested against the label ε (replace one label; ∞: no label DP).",
        ]
    return lines


def speedup_table(frame: pd.DataFrame, spec: FederatedSweep) -> list[str]:
    """Each algorithm's time and trips to target over the reference's, at equal other
    grid values (means over seeds; ∞ when a seed never reached the target)."""
    others = [k for k in spec.grid if k != "algorithm"]
    reference = spec.reference or "fedbuff"
    if "algorithm" not in spec.grid or reference not in set(frame["algorithm"]):
        return []
    lines = [
        f"| {' | '.join(others) or 'setting'} | algorithm | time ÷ {reference} | "
        f"trips ÷ {reference} |",
        "|" + "---|" * (max(1, len(others)) + 3),
    ]
    groups = frame.groupby(others, sort=False) if others else [((), frame)]
    for key, g in groups:
        key = key if isinstance(key, tuple) else (key,)
        ref = g[g["algorithm"] == reference]
        if ref.empty:
            continue
        for algorithm, a in g.groupby("algorithm", sort=False):
            ratios = []
            for short in ("time", "trips"):
                num, den = a[f"{short}_to_target"].mean(), ref[f"{short}_to_target"].mean()
                ratios.append("∞" if math.isinf(num) or math.isinf(den) else f"{num / den:.2f}")
            label = " | ".join(str(k) for k in key) or "all"
            lines.append(f"| {label} | {algorithm} | {ratios[0]} | {ratios[1]} |")
    return lines


def baseline_table(store: Any, spec: FederatedSweep, frame: pd.DataFrame) -> list[str]:
    """Each variant's final accuracy beside the baseline sweep's test accuracy at the same
    label ε (its non-private runs for ε = ∞), means over seeds; [] without a baseline."""
    if spec.baseline is None:
        return []
    from ..report import summary
    from ..sweep import SweepSpec

    central = summary(store, SweepSpec.load(spec.path.parent / spec.baseline))
    if central.empty:
        return []
    by_epsilon: dict[float, Any] = {}
    for row in central.itertuples():
        eps = math.inf if math.isnan(row.epsilon) else float(row.epsilon)
        if eps in by_epsilon:
            raise ConfigError(
                f"baseline {spec.baseline}: several rows (methods or variants) at ε = {eps:g}; "
                "a baseline sweep must have one per ε"
            )
        by_epsilon[eps] = row
    lines = [
        "| variant | label ε | federated acc. (%) | centralized acc. (%) | "
        "centralized − federated (points) |",
        "|---|---|---|---|---|",
    ]
    for variant, g in frame.groupby("variant", sort=False):
        eps = float(g["label_epsilon"].iloc[0])
        row = by_epsilon.get(eps)
        if row is None:
            continue
        federated = 100 * g["final_accuracy"].mean()
        centralized = 100 * row.accuracy_mean
        lines.append(
            f"| {variant} | {'∞' if math.isinf(eps) else f'{eps:g}'} | "
            f"{_mean_std(g['final_accuracy'], 2, 100)} | {centralized:.2f} ± "
            f"{100 * row.accuracy_std:.2f} | {centralized - federated:+.2f} |"
        )
    return lines if len(lines) > 2 else []


def write_study_report(
    store: Any, spec: FederatedSweep, typed: str, results_dir: str | Path
) -> list[Path]:
    """Writes RESULTS_DIR/<sweep>.md and .csv; returns their paths."""
    frame = study_frame(store, spec)
    out = Path(results_dir)
    commits = ", ".join(sorted({str(c) for c in frame["git_commit"]}))
    machines = "; ".join(sorted({str(m) for m in frame["machine"]}))
    lines = [
        f"# {spec.name}",
        "",
        spec.description,
        "",
        f"- command: `labeldp sweep {typed}` then `labeldp report {typed}`",
        f"- runs: {len(frame)} of {len(spec.points)} grid points; commits: {commits}",
        f"- machines: {machines}",
        f"- evaluated on: {', '.join(sorted(set(frame['evaluation_split'])))} split",
        f"- target accuracy: {100 * spec.target_accuracy:g} % (best-so-far accuracy, "
        "first crossing, interpolated between evaluations); virtual time in mean trip "
        "durations; trips = client uploads",
        "",
        *summary_table(frame, spec),
    ]
    speedups = speedup_table(frame, spec)
    if speedups:
        note = (
            "Time and trips to target over the reference algorithm's (above 1: the "
            "reference is that many times faster):"
        )
        lines += ["", note, "", *speedups]
    prices = baseline_table(store, spec, frame)
    if prices:
        lines += [
            "",
            f"The price of federation: each variant's final accuracy beside the centralized "
            f"baseline's ({spec.baseline}: mean ± std over its seeds) at the same label ε:",
            "",
            *prices,
        ]
    md = atomic_write_text(out / f"{spec.name}.md", "\n".join(lines) + "\n")
    csv = atomic_write_text(out / f"{spec.name}.csv", frame.to_csv(index=False))
    return [md, csv]
