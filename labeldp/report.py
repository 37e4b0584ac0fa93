"""Result tables of a sweep, from the store: results/<sweep>.md and results/<sweep>.csv.

Accuracy is the mean ± sample standard deviation over seeds (in %), per method and ε;
ε_LB columns give the mean over seeds of each audit's lower bound (an average of per-seed
α-level bounds, not itself an α-level bound; the minimum over seeds is one), beside the
most the audit's canaries can certify (``*_max``) and the bound the audit tests: the
run's ε for the relation the canaries exercise, a change of one label (ε for label-DP
methods, 2ε for DP-SGD's add/remove-one-example ε; the smallest over seeds). A row whose
bound tested is at or above an audit's maximum is one that audit cannot refute
(``*_cannot_fail``); ``*_violations`` counts seeds whose ε_LB exceeds the bound tested.
pate-fm rows made before the stopping rule was recorded in the ledger are marked stale.
The Markdown file starts with how to regenerate it and the commits, machines and dates of
its runs; the published numbers of the paper a sweep mirrors are printed beside ours.

A sweep that names a companion audit sweep (``audits = "<file>.toml"``, runs trained to
memorize their canaries) gets one more table: per method and ε, its accuracy next to ε
and both audits' ε_LB from the companion's runs of the same method and ε (the CSV gets
them as ``audit_*`` columns); the report says which sweep each column comes from.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from attacks import memorization, one_run
from attacks.harness import ADD_REMOVE_ONE_EXAMPLE, bound_tested

from .crossover import RANDOMIZED_LABEL_METHODS, crossover
from .io import atomic_write_text
from .methods import METHODS
from .pate_report import pate_diagnostics_section
from .provenance import provenance
from .records import AttackRecord, RunRecord
from .runner import DEFAULT_MODEL
from .store import ResultsStore
from .sweep import SweepSpec

STALE = "stale: made under the withdrawn data-dependent stopping rule (issue 12); rerun pending"
STALE_MARK, CANNOT_FAIL_MARK, UNSOUND_MARK = "‡", "†", "§"
UNSOUND = (
    "some seeds of this cell diverged or ended on the constant-prediction plateau (outcome "
    "'diverged' or 'collapsed' in their metrics.json); the accuracy is as measured, the "
    "lowest seed in the CSV's accuracy_min"
)


def is_stale(method: str, metrics: RunRecord) -> bool:
    """A pate-fm run whose ledger entry does not record its ``stopping_rule``: made under
    the withdrawn rule that stopped on the data-dependent cost (issue 12)."""
    if method != "pate-fm":
        return False
    entries = (metrics.ledger or {}).get("entries") or []
    return not entries or "stopping_rule" not in (entries[0].get("details") or {})


def _cap(
    attack: AttackRecord | None, part_name: str, config: dict[str, Any], config_key: str
) -> float:
    """The most the run's ``part_name`` audit can certify: stored in attack.json, else
    (attack.json made before it was) recomputed from the canary count."""
    part = attack.part(part_name) if attack is not None else None
    if part and part.get("epsilon_lb_max") is not None:
        return float(part["epsilon_lb_max"])
    count = part["canaries"] if part else config.get(config_key) or 0
    if not count:
        return math.nan
    alpha = (part or {}).get("alpha") or (attack.alpha if attack is not None else None) or 0.05
    module = memorization if part_name == "memorization" else one_run
    return module.epsilon_lb_max(int(count), float(alpha))


def _audit_facts(row: dict[str, Any]) -> dict[str, Any]:
    """Per run: the caps of both audits, the bound tested and its relation, violations
    (ε_LB above the bound tested) and staleness."""
    config = json.loads(row["config"])
    metrics, attack = ResultsStore.run_record(row), ResultsStore.attack_record(row)
    tested = bound_tested(row["method"], metrics.epsilon, metrics.delta, metrics)
    # the tables' convention: NaN in the bound-tested column is a non-private run (∞)
    bound = math.nan if math.isinf(tested["epsilon"]) else float(tested["epsilon"])
    facts = {
        "relation": tested["relation"] or "none",
        "bound_tested": bound,
        "eps_lb_memorization_max": _cap(attack, "memorization", config, "canaries"),
        "eps_lb_one_run_max": _cap(attack, "one_run", config, "audit_canaries"),
        "alpha": attack.alpha if attack is not None else 0.05,
        "stale": is_stale(row["method"], metrics),
    }
    for name in ("memorization", "one_run"):
        lb = row[f"eps_lb_{name}"]
        facts[f"{name}_above"] = lb is not None and not math.isnan(bound) and lb > bound
    facts["any_above"] = facts["memorization_above"] or facts["one_run_above"]
    return facts


def grid_rows(store: ResultsStore, spec: SweepSpec) -> pd.DataFrame:
    """The stored runs of ``spec`` whose configuration is in its current grid (rows left
    by an earlier version of the sweep file are not counted), with each run's audit facts
    (see :func:`_audit_facts`)."""
    variants = spec.variants()
    rows = [r for r in store.rows(spec.name) if r["key"] in variants]
    return pd.DataFrame(
        [{**r, **_audit_facts(r), "variant": variants[r["key"]], **_outcome(r)} for r in rows]
    )


def _outcome(row: dict[str, Any]) -> dict[str, Any]:
    """The run's outcome ("finished", "diverged", "collapsed") and its evaluation split."""
    metrics = ResultsStore.run_record(row)
    return {"outcome": metrics.outcome, "evaluation_split": metrics.evaluation_split}


def summary(store: ResultsStore, spec: SweepSpec) -> pd.DataFrame:
    """One row per (method, ε): accuracy mean/std/count over seeds (fractions 0–1), mean
    ε_LB of each audit, mean label-inference gap, then the audit columns (see the module
    docstring) and a note (stale rows). ε is NaN for the non-private rows."""
    rows = grid_rows(store, spec)
    if rows.empty:
        return rows
    rows["epsilon"] = rows["epsilon"].astype(float)
    rows["unsound"] = rows["outcome"] != "finished"
    grouped = rows.groupby(["method", "variant", "epsilon"], dropna=False, sort=False)
    table = grouped.agg(
        accuracy_mean=("test_accuracy", "mean"),
        accuracy_std=("test_accuracy", "std"),
        seeds=("seed", "nunique"),
        eps_lb_memorization=("eps_lb_memorization", "mean"),
        eps_lb_one_run=("eps_lb_one_run", "mean"),
        label_inference_gap=("label_inference_gap", "mean"),
        train_seconds=("train_seconds", "mean"),
        alpha=("alpha", "first"),
        relation=("relation", "first"),
        bound_tested=("bound_tested", "min"),
        eps_lb_memorization_max=("eps_lb_memorization_max", "max"),
        eps_lb_one_run_max=("eps_lb_one_run_max", "max"),
        eps_lb_memorization_min=("eps_lb_memorization", "min"),
        eps_lb_one_run_min=("eps_lb_one_run", "min"),
        memorization_violations=("memorization_above", "sum"),
        one_run_violations=("one_run_above", "sum"),
        seeds_with_violation=("any_above", "sum"),
        stale_seeds=("stale", "sum"),
        unsound_seeds=("unsound", "sum"),
        accuracy_min=("test_accuracy", "min"),
    ).reset_index()
    for name in ("memorization", "one_run"):
        table[f"{name}_cannot_fail"] = table["bound_tested"] >= table[f"eps_lb_{name}_max"]
    table["note"] = [
        "; ".join(
            part
            for part in (
                STALE if n == s else f"{STALE} ({n} of {s} seeds)" if n else "",
                f"{u} of {s} seeds diverged or collapsed" if u else "",
            )
            if part
        )
        for n, u, s in zip(
            table["stale_seeds"], table["unsound_seeds"], table["seeds"], strict=True
        )
    ]
    order = {m: i for i, m in enumerate(["none", *spec.methods])}
    table["order"] = table["method"].map(order).fillna(len(order))
    # variants in the grid's own order (file order, values as listed), not as strings
    grid_order = {v: i for i, v in enumerate(dict.fromkeys(v for *_, v in spec.points()))}
    table["variant_order"] = table["variant"].map(grid_order).fillna(len(grid_order))
    return (
        table.sort_values(["order", "variant_order", "variant", "epsilon"], kind="stable")
        .drop(columns=["order", "variant_order"])
        .reset_index(drop=True)
    )


def _accuracy(mean: float, std: float, seeds: int, of: int = 1) -> str:
    """mean ± std in %, with "(k of n seeds)" when only k of the sweep's n seeds ran."""
    text = (
        f"{100 * mean:.2f} ± {100 * std:.2f}"
        if seeds > 1 and not math.isnan(std)
        else f"{100 * mean:.2f}"
    )
    return text if seeds >= of else f"{text} ({seeds} of {of} seeds)"


def _tested_cell(bound: float, relation: str) -> str:
    """The "bound tested" cell: ∞ for a non-private run (NaN), else the bound, marked
    (2ε) for DP-SGD's add/remove-one-example ε."""
    if math.isnan(bound):
        return "∞"
    return f"{bound:.3g}" + (" (2ε)" if relation == ADD_REMOVE_ONE_EXAMPLE else "")


def _cell(row: Any, of: int) -> str:
    """One accuracy cell: mean ± std over seeds, marked when a seed diverged or collapsed."""
    text = _accuracy(row["accuracy_mean"], row["accuracy_std"], row["seeds"], of)
    return text + (f" {UNSOUND_MARK}" if row["unsound_seeds"] else "")


def _method_variants(table: pd.DataFrame, spec: SweepSpec) -> list[tuple[str, str]]:
    """(method, variant) of every private table row, in the sweep's method order."""
    pairs = []
    for method in spec.methods:
        for variant in table.loc[table["method"] == method, "variant"].drop_duplicates():
            pairs.append((method, variant))
    return pairs


def _best_variants(table: pd.DataFrame) -> list[str]:
    """Per (method, ε), the ``[grid]`` variant with the best mean accuracy on the
    validation split: the tuning choice (a sweep scored on the test split gets no such
    section: its variants are a comparison, and nothing is chosen on test data)."""
    lines = [
        "",
        "## Best variant per method and ε (highest mean validation accuracy)",
        "",
        "| method | ε | variant | accuracy (%) | runner-up | its accuracy (%) |",
        "|---|---|---|---|---|---|",
    ]
    for (method, eps), group in table.groupby(["method", "epsilon"], dropna=False, sort=False):
        ranked = group.sort_values("accuracy_mean", ascending=False)
        best = ranked.iloc[0]
        second = ranked.iloc[1] if len(ranked) > 1 else None
        lines.append(
            f"| {method} | {'∞' if math.isnan(eps) else f'{eps:g}'} | {best.variant or '–'} | "
            f"{100 * best.accuracy_mean:.2f} | "
            f"{'–' if second is None else second.variant} | "
            f"{'–' if second is None else f'{100 * second.accuracy_mean:.2f}'} |"
        )
    return lines


def _bound(value: float) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return "∞" if math.isinf(value) else f"{value:.2f}"


def _method_label(table: pd.DataFrame, method: str, stale_seeds: int | None = None) -> str:
    """The method's name, with the stale mark when (some of) its runs are stale."""
    if stale_seeds is None:
        stale_seeds = int(table.loc[table["method"] == method, "stale_seeds"].sum())
    return f"{method} {STALE_MARK}" if stale_seeds else method


def _first(column: pd.Series) -> float:
    values = column.dropna()
    return float(values.iloc[0]) if len(values) else math.nan


def _audit_section(table: pd.DataFrame, spec: SweepSpec) -> list[str]:
    """The "what the runs leak" section: per (method, ε), the bound the canaries test,
    each audit's mean ε_LB beside the most its canaries can certify, the seeds whose own
    ε_LB exceeds the bound tested, and the label-inference gap."""
    alpha = _first(table["alpha"]) if table["alpha"].notna().any() else 0.05
    confidence = f"{100 * (1 - alpha):g} %"
    k = len(spec.seeds)
    mem_cap, one_cap = _first(table["eps_lb_memorization_max"]), _first(table["eps_lb_one_run_max"])
    canaries, audit_canaries = spec.run.get("canaries", 0), spec.run.get("audit_canaries", 0)
    caps = []
    if canaries:
        caps.append(
            f"{_bound(mem_cap)} for the memorization attack ({canaries} canaries, bound "
            f"measured on {memorization.measured_canaries(canaries)})"
        )
    if audit_canaries:
        caps.append(
            f"{_bound(one_cap)} for the one-run audit ({audit_canaries} canaries, "
            f"level α/{len(one_run.guess_sizes(audit_canaries))} for the largest guess count)"
        )
    if k > 1:
        seeds = (
            f"Each ε_LB cell is the mean over the {k} seeds of per-seed lower bounds, each a "
            f"{confidence}-confidence lower bound on its own; the mean is not itself a "
            f"{confidence} lower bound (by the union bound it holds only at "
            f"{100 * max(0.0, 1 - k * alpha):g} % confidence). The α-level statements are the "
            "per-seed bounds, which the column of seeds above the bound checks one by one, "
            "and their minimum over seeds (the CSV's eps_lb_*_min columns)."
        )
    else:
        seeds = f"With one seed each ε_LB is that run's {confidence}-confidence lower bound."
    lines = [
        "",
        "## What the runs leak" + (" (mean over seeds)" if k > 1 else ""),
        "",
        f"ε_LB at α = {alpha:g}: memorization attack (threshold chosen on half the canaries, "
        "bound on the other half) and one-run audit (Bonferroni over 5 guess counts). "
        '"max" is the most an audit\'s canaries can certify, the ε_LB of a perfect attack: '
        + "; ".join(caps)
        + ". An ε_LB at its max means every guess was right: the canary count, not the model, "
        'limits it. "Bound tested" is the claimed ε for the relation the canaries test, a '
        "change of one label: ε itself for the label-DP methods (replace one label), 2ε for "
        "dp-sgd, whose ε is for adding or removing one example (a change is a removal and an "
        "addition; group privacy of size 2 gives (2ε, (1 + e^ε)·δ)); the claimed ε is the "
        "run's spent ε, the smallest over seeds (a run may spend less than its budget, as "
        "pate-fm's do). "
        f"{CANNOT_FAIL_MARK} marks a max at or below the bound tested: that ε is above what "
        "the canaries can certify, so the audit cannot refute it, whatever the model leaks. "
        f"{seeds} Label-inference gap: attack accuracy on training labels minus on held-out "
        "labels. Across the many runs of a sweep a few false alarms (ε_LB > bound tested) "
        "are expected at level α, so treat a single one as a prompt to rerun with more "
        "canaries, and several as a bug.",
        "",
        "| method | ε | bound tested | ε_LB memorization | max | ε_LB one-run | max | "
        "seeds with ε_LB > bound | label-inference gap |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in table.itertuples():
        eps = "∞" if math.isnan(r.epsilon) else f"{r.epsilon:g}"
        tested = _tested_cell(r.bound_tested, r.relation)
        if math.isnan(r.bound_tested):
            above = "–"
        else:
            above = f"{int(r.seeds_with_violation)} of {r.seeds}"
            if r.seeds_with_violation:
                above = f"**{above}**"
        caps_cells = [
            _bound(cap) + (CANNOT_FAIL_MARK if cannot else "")
            for cap, cannot in (
                (r.eps_lb_memorization_max, r.memorization_cannot_fail),
                (r.eps_lb_one_run_max, r.one_run_cannot_fail),
            )
        ]
        lines.append(
            f"| {_method_label(table, r.method, r.stale_seeds)} | {eps} | {tested} | "
            f"{_bound(r.eps_lb_memorization)} | {caps_cells[0]} | "
            f"{_bound(r.eps_lb_one_run)} | {caps_cells[1]} | {above} | "
            f"{r.label_inference_gap:+.4f} |"
        )
    notes = []
    if table["memorization_cannot_fail"].any() or table["one_run_cannot_fail"].any():
        notes.append(
            f"{CANNOT_FAIL_MARK} ε above what {canaries} memorization / {audit_canaries} audit "
            "canaries can certify: the audit cannot refute it."
        )
    if table["stale_seeds"].any():
        notes.append(f"{STALE_MARK} {STALE}.")
    return [*lines, *(line for note in notes for line in ("", note))]


#: Marks an ε_LB of the side-by-side table taken from the utility run itself (its method
#: is not in the audit sweep).
OWN_RUNS_MARK = "°"
#: The columns :func:`companion_audits` adds, per utility row, from the audit sweep.
COMPANION_COLUMNS = (
    "eps_lb_memorization",
    "eps_lb_memorization_max",
    "eps_lb_one_run",
    "eps_lb_one_run_max",
    "bound_tested",
    "relation",
    "memorization_cannot_fail",
    "one_run_cannot_fail",
    "seeds",
    "seeds_with_violation",
)


def companion_audits(store: ResultsStore, spec: SweepSpec, table: pd.DataFrame) -> pd.DataFrame:
    """Per row of ``table`` (``summary(store, spec)``), the audit columns of the same
    method and ε from ``spec``'s audit sweep (``spec.audit_spec``), prefixed ``audit_``
    (see :data:`COMPANION_COLUMNS`; ε_LB means over the audit sweep's seeds), and
    ``audit_source``: the audit sweep's name; or, for a method the audit sweep does not
    run, the utility row's own columns with source "own runs"; or NaN and "" where the
    audit sweep has no stored run of that point yet. Requires ``spec.audit_spec``."""
    companion = spec.audit_spec
    if companion is None:
        raise ValueError(f"sweep {spec.name} names no audit sweep (audits = ...)")
    theirs = summary(store, companion)
    out = []
    for row in table.itertuples(index=False):
        row = row._asdict()
        own = row["method"] != "none" and row["method"] not in companion.methods
        source: dict[str, Any] | None = row if own else None
        if not own and not theirs.empty:
            same = theirs["method"] == row["method"]
            if math.isnan(row["epsilon"]):
                same &= theirs["epsilon"].isna()
            else:
                same &= theirs["epsilon"] == row["epsilon"]
            hit = theirs[same]
            source = None if hit.empty else hit.iloc[0].to_dict()
        cells = {f"audit_{c}": math.nan if source is None else source[c] for c in COMPANION_COLUMNS}
        cells["audit_source"] = "own runs" if own else companion.name if source else ""
        out.append(cells)
    return pd.DataFrame(out, index=table.index)


def _flag(value: Any) -> bool:
    """A count or flag of the merged audit columns as a bool (NaN, a missing point: False)."""
    return value is not None and not pd.isna(value) and bool(value)


def _train_size(spec: SweepSpec) -> str:
    size = spec.run.get("train_size")
    return "all the" if size is None else f"{size:,}"


def _companion_section(
    table: pd.DataFrame, audits: pd.DataFrame, spec: SweepSpec, split: str
) -> list[str]:
    """The side-by-side table: per (method, ε), this sweep's accuracy (on ``split``) next
    to ε and the ε_LB of both audits from the audit sweep's runs, with the sentence saying
    where each column comes from."""
    companion = spec.audit_spec
    assert companion is not None
    seeds = "seed" + ("s" if len(spec.seeds) > 1 else "") + f" {spec.seeds}"
    their_seeds = "seed" + ("s" if len(companion.seeds) > 1 else "") + f" {companion.seeds}"
    canaries = companion.run.get("canaries", 0)
    audit_canaries = companion.run.get("audit_canaries", 0)
    own_methods = [m for m in spec.methods if m not in companion.methods]
    mean = " (mean over its seeds)" if len(companion.seeds) > 1 else ""
    sentence = (
        f"Accuracy comes from the utility runs of sweep {spec.name} ({_train_size(spec)} "
        f"training examples, {seeds}; the tables above); ε is the claimed ε; the bound "
        f"tested, ε_LB and max come from the audit runs of sweep {companion.name}{mean} "
        f"(same method and ε, {their_seeds}, {_train_size(companion)} training examples "
        f"carrying {canaries} memorization and {audit_canaries} audit canaries, trained to "
        f"memorize them; its report is {companion.name}.md), not from the utility runs, "
        'whose own canaries the section "What the runs leak" below audits.'
    )
    if own_methods:
        sentence += (
            f" {OWN_RUNS_MARK} {', '.join(own_methods)} is not in the audit sweep: its ε_LB "
            f"here is its utility runs' own ({spec.run.get('canaries', 0)} memorization and "
            f"{spec.run.get('audit_canaries', 0)} audit canaries)."
        )
    lines = [
        "",
        f"## Accuracy next to what the audit runs leak ({companion.name})",
        "",
        sentence,
        "",
        f"| method | ε | {split} accuracy (%) | bound tested | ε_LB memorization | max | "
        "ε_LB one-run | max |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (_, r), (_, a) in zip(table.iterrows(), audits.iterrows(), strict=True):
        eps = "∞" if math.isnan(r["epsilon"]) else f"{r['epsilon']:g}"
        mark = OWN_RUNS_MARK if a["audit_source"] == "own runs" else ""
        label = _method_label(table, r["method"], r["stale_seeds"])
        label += f" [{r['variant']}]" if r["variant"] else ""
        tested = a["audit_bound_tested"]
        tested_cell = (
            _tested_cell(math.nan if tested is None else tested, a["audit_relation"])
            if a["audit_source"]
            else "–"
        )

        def lb(name: str, a=a, mark=mark) -> str:
            value = a[f"audit_eps_lb_{name}"]
            if value is None or (isinstance(value, float) and math.isnan(value)):
                return "–"
            text = _bound(value) + mark
            return f"**{text}**" if _flag(a["audit_seeds_with_violation"]) else text

        def cap(name: str, a=a) -> str:
            cannot = _flag(a[f"audit_{name}_cannot_fail"])
            return _bound(a[f"audit_eps_lb_{name}_max"]) + (CANNOT_FAIL_MARK if cannot else "")

        lines.append(
            f"| {label} | {eps} | {_cell(r, len(spec.seeds))} | {tested_cell} | "
            f"{lb('memorization')} | {cap('memorization')} | {lb('one_run')} | "
            f"{cap('one_run')} |"
        )
    missing = int((audits["audit_source"] == "").sum())
    if missing:
        lines += [
            "",
            f"– no run of sweep {companion.name} in the store yet for {missing} of "
            f"{len(audits)} rows: run `labeldp sweep` on it (or `labeldp reproduce`), then "
            "this report again.",
        ]
    if audits["audit_seeds_with_violation"].map(_flag).any():
        lines += ["", "Bold: some audit run's ε_LB exceeds the bound tested (see its report)."]
    cannot_fail = audits[["audit_memorization_cannot_fail", "audit_one_run_cannot_fail"]]
    if cannot_fail.map(_flag).to_numpy().any():
        lines += [
            "",
            f"{CANNOT_FAIL_MARK} the bound tested is at or above what the audit's canaries can "
            "certify: that audit cannot refute it.",
        ]
    return lines


def write_report(
    store: ResultsStore, spec: SweepSpec, sweep_file: str | Path, out_dir: str | Path = "results"
) -> tuple[Path, Path]:
    """Writes results/<sweep>.md and .csv (atomically) and returns their paths."""
    out_dir = Path(out_dir)
    table = summary(store, spec)
    csv_path, md_path = out_dir / f"{spec.name}.csv", out_dir / f"{spec.name}.md"
    audits = (
        companion_audits(store, spec, table)
        if spec.audit_spec is not None and not table.empty
        else None
    )
    csv_table = table if audits is None else pd.concat([table, audits], axis=1)
    atomic_write_text(csv_path, csv_table.to_csv(index=False))
    runs = grid_rows(store, spec)
    split = (
        "validation"
        if not runs.empty and (runs["evaluation_split"] == "validation").all()
        else "test"
    )
    now = provenance()
    lines = [f"# {spec.name}", ""]
    if spec.description:
        lines += [spec.description, ""]
    if runs.empty:
        lines.append("No finished runs in the store yet.")
    else:
        no_commit = "none (not run from a git checkout)"  # e.g. an installed labeldp
        commits = ", ".join(sorted(set(runs["git_commit"].fillna(no_commit))))
        machines = "; ".join(sorted(set(runs["machine"].fillna("?"))))
        lines += [
            f"- made by: `labeldp sweep {sweep_file}` then `labeldp report {sweep_file}` "
            f"(or `labeldp reproduce`)",
            f"- runs: {len(runs)} of {len(spec.runs())} in the grid, at commits {commits}",
            f"- machines: {machines}",
            f"- runs finished {runs['finished_at'].min()} to {runs['finished_at'].max()}; "
            f"report written {now['date']} "
            + (
                f"at commit {now['git_commit']}"
                if now["git_commit"]
                else f"by labeldp {now['labeldp_version']} (installed, no git checkout)"
            ),
            f"- {spec.dataset}, model {_model_text(spec)}, "
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
            f"## {split.capitalize()} accuracy (%)"
            + (" — mean ± std over seeds" if len(spec.seeds) > 1 else ""),
            "",
        ]
        eps_grid = spec.all_epsilons
        lines.append("| method | " + " | ".join(f"ε={e:g}" for e in eps_grid) + " |")
        lines.append("|---" * (len(eps_grid) + 1) + "|")
        for method, variant in _method_variants(table, spec):
            cells = []
            mine = table[(table["method"] == method) & (table["variant"] == variant)]
            for e in eps_grid:
                hit = mine[mine["epsilon"] == e]
                cells.append("–" if hit.empty else _cell(hit.iloc[0], len(spec.seeds)))
            label = _method_label(mine, method) + (f" [{variant}]" if variant else "")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        for r in table[table["method"] == "none"].itertuples():
            label = "none (ε = ∞)" + (f" [{r.variant}]" if r.variant else "")
            lines.append(
                f"| {label} | {_cell(r._asdict(), len(spec.seeds))} |" + " |" * (len(eps_grid) - 1)
            )
        if table["unsound_seeds"].any():
            lines += ["", f"{UNSOUND_MARK} {UNSOUND}."]
        lines += _crossover_section(table, spec)
        if audits is not None:
            lines += _companion_section(table, audits, spec, split)
        if spec.grid and split == "validation":  # a choice is made on validation data only
            lines += _best_variants(table)
        if table["stale_seeds"].any():
            lines += ["", f"{STALE_MARK} {STALE}."]
        for method in spec.methods:
            meaning = METHODS[method].epsilon_meaning if method in METHODS else None
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
            lines += _audit_section(table, spec)
        lines += pate_diagnostics_section(runs)
    atomic_write_text(md_path, "\n".join(lines) + "\n")
    return md_path, csv_path


#: The methods that add noise to gradients, which the randomized-label ones overtake as ε grows.
GRADIENT_NOISE_METHODS = ("labeldp-pro", "dp-sgd")


def _crossover_section(table: pd.DataFrame, spec: SweepSpec) -> list[str]:
    """Per randomized-label method, the ε* at which it overtakes each gradient-noise method
    of the sweep (labeldp.crossover), from the mean accuracies; none without both kinds or
    in a sweep with a [grid] (its variants are not one curve per method)."""
    challengers = [m for m in spec.methods if m in RANDOMIZED_LABEL_METHODS]
    incumbents = [m for m in spec.methods if m in GRADIENT_NOISE_METHODS]
    if spec.grid or not challengers or not incumbents:
        return []

    def curve(method: str) -> dict[float, float]:
        mine = table[(table["method"] == method) & table["accuracy_mean"].notna()]
        return dict(zip(mine["epsilon"], mine["accuracy_mean"], strict=True))

    curves = {m: curve(m) for m in challengers + incumbents}
    lines = [
        "",
        "## Crossover ε*: where the randomized-label methods overtake the gradient-noise ones",
        "",
        "| method | " + " | ".join(f"overtakes {m} at ε*" for m in incumbents) + " |",
        "|---" * (len(incumbents) + 1) + "|",
    ]
    for challenger in challengers:
        cells = []
        for incumbent in incumbents:
            if not set(curves[challenger]) & set(curves[incumbent]):
                cells.append("–")
                continue
            cells.append(
                crossover(curves[challenger], curves[incumbent], (challenger, incumbent)).text()
            )
        lines.append(f"| {challenger} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "ε* follows the mean accuracies: after the largest ε of the shared grid where the "
        "method is not ahead, the difference interpolated linearly in log ε to zero. Where the "
        "two curves are within their seeds' spread (the table's ±) near ε*, it is a rough "
        "estimate. dp-sgd's ε is for adding or removing an example, the others' for changing "
        "a label: its column compares nominal ε.",
    ]
    return lines


def _model_text(spec: SweepSpec) -> str:
    """The model(s) of a sweep's runs, as the report's header states them."""
    if "model" in spec.grid:
        return f"per variant ([grid] model = {spec.grid['model']})"
    model = spec.run.get("model") or DEFAULT_MODEL[spec.dataset]
    if spec.recipes and "model" not in spec.run:
        return f"{model} unless a method's recipe sets its own (labeldp recipes)"
    return model
