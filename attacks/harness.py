"""Runs every attack on finished run folders and tabulates ε_LB next to ε.

For each run folder: reads metrics.json (the claimed ε: :func:`read_claim`), canaries.pt
and outputs.pt, runs the memorization attack (memorization canaries), the one-run audit
(audit canaries) and label inference, and writes attack.json atomically into the folder.
A federation's folder (labeldp.fl.run) is attacked the same way, its final global model
held to the label ε of its clients' label mechanism (:func:`federation_claim`).

Every ε_LB comes with the most its canary count could certify (``epsilon_lb_max``, the
bound of a perfect attack) and is held to the bound of the relation the attack tests:
the canaries change one label, so a method whose ε is for replacing one label is held to
ε, and DP-SGD, whose ε is for adding or removing one example, to 2ε (a replacement is a
removal and an addition; group privacy of size 2 gives (2ε, (1 + e^ε)·δ)). Where that
bound is at or above ``epsilon_lb_max`` the audit cannot fail, and the result says so.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from labeldp.errors import ConfigError
from labeldp.io import atomic_write_json
from labeldp.privacy.neighbouring import Neighbouring
from labeldp.records import AttackRecord, RunRecord, number_from_json
from labeldp.run_folder import diagnostic_file
from labeldp.seeding import Stream, derive_seed

from .canaries import Canaries
from .label_inference import label_inference
from .memorization import memorization_attack
from .one_run import audit

NO_CANARIES = "no canaries in this run (train with --canaries M / --audit-canaries M)"

REPLACE_ONE_LABEL = Neighbouring.REPLACE_ONE_LABEL.value  # "replace one label"
ADD_REMOVE_ONE_EXAMPLE = Neighbouring.ADD_REMOVE_ONE_EXAMPLE.value  # "add or remove one example"

#: The neighbouring relation each method's ε is stated for, for ledgers stored before
#: they named it (a run whose ledger names its relation is taken at its word instead).
RELATIONS: dict[str, str] = {
    "rr": REPLACE_ONE_LABEL,
    "lp-mst": REPLACE_ONE_LABEL,
    "lp-2st": REPLACE_ONE_LABEL,
    "alibi": REPLACE_ONE_LABEL,
    "pate-fm": REPLACE_ONE_LABEL,
    "dp-sgd": ADD_REMOVE_ONE_EXAMPLE,
}


def relation(method: str, metrics: RunRecord | Mapping[str, Any] | None = None) -> str | None:
    """The neighbouring relation the run's ε is for (``metrics``: the run's record, or a
    mapping with its ``ledger``): the one its ledger names (the
    ledger's ``relation``, else its entries' ``relation``, else, in ledgers stored before
    entries had one, their ``details.neighboring_relation``), else the method's in
    :data:`RELATIONS`, else "replace one label" (label DP's own). None for the
    non-private method."""
    if method == "none":
        return None
    if isinstance(metrics, RunRecord):
        ledger = metrics.ledger or {}
    else:
        ledger = (metrics or {}).get("ledger") or {}
    if ledger.get("relation"):
        return ledger["relation"]
    entries = ledger.get("entries") or []
    named = {
        e.get("relation") or (e.get("details") or {}).get("neighboring_relation") for e in entries
    } - {None}
    if len(named) == 1:
        return named.pop()
    return RELATIONS.get(method, REPLACE_ONE_LABEL)


def bound_tested(
    method: str,
    epsilon: float | None,
    delta: float | None = 0.0,
    metrics: RunRecord | Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The (ε, δ) a label-change canary attack can be held to, for a run claiming
    (``epsilon``, ``delta``) under its method's relation: the claim itself for "replace
    one label", (2ε, (1 + e^ε)·δ) for "add or remove one example". A non-private run's ε
    is math.inf (None is read so too): the bound is then ε = math.inf, δ None."""
    rel = relation(method, metrics)
    delta = delta or 0.0
    if epsilon is None or math.isinf(epsilon) or rel is None:
        return {"relation": rel, "epsilon": math.inf, "delta": None, "from": "no privacy claimed"}
    if rel == ADD_REMOVE_ONE_EXAMPLE:
        from labeldp.privacy.dpsgd_accounting import replace_one_bound

        eps, dlt = replace_one_bound(epsilon, delta)
        return {
            "relation": rel,
            "epsilon": eps,
            "delta": dlt,
            "from": "group privacy of size 2: changing a label removes one example and adds one",
        }
    return {"relation": rel, "epsilon": epsilon, "delta": delta, "from": "the claimed ε"}


def judge(part: dict[str, Any] | None, bound: float | None) -> dict[str, Any] | None:
    """Adds to one attack's result whether its ε_LB exceeds the bound tested
    (``exceeds_bound``: a privacy violation at level α) and whether it could have
    (``can_fail``: False when the bound is at or above ``epsilon_lb_max``). A bound of
    math.inf (or None): no privacy claimed, nothing to exceed."""
    if part is None:
        return None
    lb, cap = part["epsilon_lb"], part["epsilon_lb_max"]
    claimed = bound is not None and not math.isinf(bound)
    part["exceeds_bound"] = claimed and lb > bound
    part["can_fail"] = claimed and bound < cap
    return part


def _probabilities(part: dict[str, torch.Tensor]) -> torch.Tensor:
    """float64 softmax from the stored logits (finer than the stored float32 softmax)."""
    return torch.softmax(part["logits"].double(), dim=1)


@dataclass(frozen=True)
class Claim:
    """What a finished run claims, as the attacks read it: its ``method`` (for a
    federation, the clients' label mechanism), its ``epsilon`` (math.inf when nothing is
    claimed) and ``delta`` (None then), the ``ledger`` that names its relation (JSON
    form), the run ``seed`` (the attacks' split is drawn from it) and ``notes`` that
    attack.json repeats."""

    method: str
    epsilon: float
    delta: float | None
    ledger: Mapping[str, Any]
    seed: int
    notes: tuple[str, ...] = ()


#: Why a federation is held to its label ε and never to its user-level one.
FEDERATION_NOTE = (
    "a federation: the canaries replace one label each, so the bound tested is the label "
    "ε of the clients' label mechanism (replace one label); the user-level (ε, δ), for "
    "another relation (one user), is not tested"
)


def federation_claim(record: Any) -> Claim:
    """The claim of a federation (a :class:`labeldp.fl.run.FederationRecord`): its label
    ledger ("replace one label"; empty, ε = ∞, for label_privacy "none"), never its
    user-level ledger."""
    ledger = record.label_ledger
    epsilon = float(number_from_json(ledger.get("epsilon"), none=math.inf))
    return Claim(
        method=record.options["label_privacy"],
        epsilon=epsilon,
        delta=None if math.isinf(epsilon) else number_from_json(ledger.get("delta")),
        ledger=ledger,
        seed=record.seed,
        notes=(FEDERATION_NOTE,),
    )


def read_claim(run_dir: str | Path) -> Claim:
    """The claim of the finished run in ``run_dir``: from its metrics.json, a
    :class:`RunRecord` or, when config.json says ``kind = "federation"``, a federation's
    record (:func:`federation_claim`)."""
    run_dir = Path(run_dir)
    data = json.loads((run_dir / "metrics.json").read_text())
    config = json.loads((run_dir / "config.json").read_text())
    if config.get("kind") == "federation":
        from labeldp.fl.run import FederationRecord  # labeldp.fl.run imports this module

        return federation_claim(FederationRecord.from_json(data))
    metrics = RunRecord.from_json(data)
    seed = config["run"]["train"]["seed"]
    return Claim(metrics.method, metrics.epsilon, metrics.delta, metrics.ledger or {}, seed)


def attack_run(run_dir: str | Path, alpha: float = 0.05) -> AttackRecord:
    """Attacks one finished run; writes ``attack.json`` (the record's JSON form) and
    returns its record."""
    run_dir = Path(run_dir)
    metrics_path = run_dir / "metrics.json"
    outputs_path = diagnostic_file(run_dir, "outputs.pt")
    if not metrics_path.exists():
        raise ConfigError(f"{run_dir} holds no finished run (no metrics.json)")
    if not outputs_path.exists():
        raise ConfigError(f"{run_dir} has no outputs.pt; it was made by a labeldp without attacks")
    return attack_claim(run_dir, read_claim(run_dir), alpha)


def attack_claim(run_dir: str | Path, claim: Claim, alpha: float = 0.05) -> AttackRecord:
    """Attacks the outputs a run stored in ``run_dir`` (diagnostics/outputs.pt and
    canaries.pt) against ``claim``; writes ``attack.json`` and returns its record. A run
    that writes its metrics.json last calls this before, with the claim it will record."""
    run_dir = Path(run_dir)
    outputs = torch.load(
        diagnostic_file(run_dir, "outputs.pt"), map_location="cpu", weights_only=True
    )
    seed = claim.seed
    tested = bound_tested(claim.method, claim.epsilon, claim.delta, {"ledger": claim.ledger})
    result: dict[str, Any] = {
        "run": str(run_dir),
        "method": claim.method,
        "epsilon": claim.epsilon,
        "delta": claim.delta,
        "bound_tested": tested,
        "alpha": alpha,
        "memorization": None,
        "one_run": None,
        "notes": list(claim.notes),
    }
    canaries_path = diagnostic_file(run_dir, "canaries.pt")
    canaries = Canaries.load(canaries_path) if canaries_path.exists() else None
    if canaries is not None and len(canaries.indices):
        generator = torch.Generator().manual_seed(derive_seed(seed, Stream.ATTACK_SPLIT))
        result["memorization"] = memorization_attack(
            _probabilities(outputs["canary"]),
            canaries.canary_labels,
            canaries.other_labels,
            generator,
            alpha,
        )
    if canaries is not None and len(canaries.audit_indices):
        # Log-probabilities in float64: confident models leave tiny wrong-label
        # probabilities that float32 differences would tie.
        log_probs = torch.log_softmax(outputs["audit"]["logits"].double(), dim=1)
        rows = torch.arange(len(canaries.audit_indices))
        result["one_run"] = audit(
            log_probs[rows, canaries.audit_a],
            log_probs[rows, canaries.audit_b],
            canaries.audit_is_a,
            alpha,
        )
    if result["memorization"] is None and result["one_run"] is None:
        result["notes"].append(NO_CANARIES)
    bound = tested["epsilon"]
    for name in ("memorization", "one_run"):
        part = judge(result[name], bound)
        if part is None or math.isinf(bound):
            continue
        if part["exceeds_bound"]:
            result["notes"].append(
                f"{name}: ε_LB {part['epsilon_lb']} > {bound:.4g}, the bound the run's "
                f"{tested['relation']} ε implies for a label change: a privacy violation "
                f"at level α = {alpha:g}"
            )
        elif not part["can_fail"]:
            result["notes"].append(
                f"{name}: ε = {bound:.4g} for a label change is at or above "
                f"{part['epsilon_lb_max']:.2f}, the most {part['canaries']} canaries "
                "can certify: this audit cannot refute it"
            )
    if claim.delta:
        result["notes"].append(
            f"the run claims (ε, δ) with δ = {claim.delta:g}; the bounds here assume pure ε-DP"
        )
    result["label_inference"] = label_inference(
        outputs["train_sample"]["softmax"],
        outputs["train_sample"]["labels"],
        outputs["heldout"]["softmax"],
        outputs["heldout"]["labels"],
        None if math.isinf(claim.epsilon) else claim.epsilon,
        claim.delta,
    )
    record = AttackRecord(**{**result, "notes": tuple(result["notes"])})
    atomic_write_json(run_dir / "attack.json", record.to_json())
    return AttackRecord.from_json(record.to_json())  # as a reader of attack.json sees it


def _tested_cell(tested: Mapping[str, Any]) -> str:
    if tested.get("epsilon") is None or math.isinf(tested["epsilon"]):
        return "∞"
    doubled = tested["relation"] == ADD_REMOVE_ONE_EXAMPLE
    return f"{tested['epsilon']:.4g}" + (" (2ε)" if doubled else "")


def format_table(results: list[AttackRecord]) -> str:
    """A plain-text table: method, ε, the bound tested (ε or 2ε, see :func:`bound_tested`),
    each audit's ε_LB with the most its canaries can certify, the label-inference gap.
    "†" marks a maximum at or below the bound tested (the audit cannot fail), "!" an
    ε_LB above the bound tested (a violation at level α)."""

    def num(x: float | None) -> str:
        if x is None:
            return "–"
        if math.isinf(x):
            return "∞" if x > 0 else "-∞"
        return f"{x:.2f}"

    def attack_cells(part: dict[str, Any] | None) -> tuple[str, str]:
        if not part:
            return "–", "–"
        lb = num(part["epsilon_lb"]) + ("!" if part.get("exceeds_bound") else "")
        cap = part.get("epsilon_lb_max")
        return lb, num(cap) + ("" if part.get("can_fail", True) else "†")

    header = (
        "run",
        "method",
        "ε",
        "bound tested",
        "ε_LB memorization",
        "max",
        "ε_LB one-run",
        "max",
        "label-inference gap",
    )
    rows = [header]
    for r in results:
        tested = r.bound_tested or {}
        rows.append(
            (
                Path(r.run).name,
                r.method,
                "∞" if math.isinf(r.epsilon) else f"{r.epsilon:g}",
                _tested_cell(tested),
                *attack_cells(r.memorization),
                *attack_cells(r.one_run),
                f"{r.label_inference['gap']:+.3f}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    body = [cell for row in rows[1:] for cell in row]
    if any(cell.endswith("!") for cell in body):
        lines.append("! ε_LB above the bound tested: a privacy violation at level α")
    if any(cell.endswith("†") for cell in body):
        lines.append(
            "† the bound tested is at or above the most these canaries can certify: "
            "the audit cannot refute it"
        )
    lines.append(
        "bound tested: the run's ε for a label change (2ε for an add/remove-one-example ε)"
    )
    return "\n".join(lines)
