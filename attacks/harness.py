"""Runs every attack on finished run folders and tabulates ε_LB next to ε.

For each run folder: reads metrics.json (the claimed ε), canaries.pt and outputs.pt,
runs the memorization attack (memorization canaries), the one-run audit (audit canaries)
and label inference, and writes attack.json atomically into the folder.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from labeldp.errors import ConfigError
from labeldp.io import atomic_write_json
from labeldp.seeding import Stream, derive_seed

from .canaries import Canaries
from .label_inference import label_inference
from .memorization import memorization_attack
from .one_run import audit

NO_CANARIES = "no canaries in this run (train with --canaries M / --audit-canaries M)"


def _json_number(x: float | None) -> float | str | None:
    """JSON has no infinity: ±inf becomes the string "inf"/"-inf"."""
    if x is None or math.isfinite(x):
        return x
    return "inf" if x > 0 else "-inf"


def _jsonable(result: dict[str, Any]) -> dict[str, Any]:
    return {k: _json_number(v) if isinstance(v, float) else v for k, v in result.items()}


def _probabilities(part: dict[str, torch.Tensor]) -> torch.Tensor:
    """float64 softmax from the stored logits (finer than the stored float32 softmax)."""
    return torch.softmax(part["logits"].double(), dim=1)


def attack_run(run_dir: str | Path, alpha: float = 0.05) -> dict[str, Any]:
    """Attacks one finished run; writes and returns ``attack.json``'s content."""
    run_dir = Path(run_dir)
    metrics_path, outputs_path = run_dir / "metrics.json", run_dir / "outputs.pt"
    if not metrics_path.exists():
        raise ConfigError(f"{run_dir} holds no finished run (no metrics.json)")
    if not outputs_path.exists():
        raise ConfigError(f"{run_dir} has no outputs.pt; it was made by a labeldp without attacks")
    metrics = json.loads(metrics_path.read_text())
    outputs = torch.load(outputs_path, map_location="cpu", weights_only=True)
    seed = json.loads((run_dir / "config.json").read_text())["run"]["train"]["seed"]
    result: dict[str, Any] = {
        "run": str(run_dir),
        "method": metrics["method"],
        "epsilon": metrics["epsilon"],
        "delta": metrics["delta"],
        "alpha": alpha,
        "memorization": None,
        "one_run": None,
        "notes": [],
    }
    canaries_path = run_dir / "canaries.pt"
    canaries = Canaries.load(canaries_path) if canaries_path.exists() else None
    if canaries is not None and len(canaries.indices):
        generator = torch.Generator().manual_seed(derive_seed(seed, Stream.ATTACK_SPLIT))
        result["memorization"] = _jsonable(
            memorization_attack(
                _probabilities(outputs["canary"]),
                canaries.canary_labels,
                canaries.other_labels,
                generator,
                alpha,
            )
        )
    if canaries is not None and len(canaries.audit_indices):
        # Log-probabilities in float64: confident models leave tiny wrong-label
        # probabilities that float32 differences would tie.
        log_probs = torch.log_softmax(outputs["audit"]["logits"].double(), dim=1)
        rows = torch.arange(len(canaries.audit_indices))
        result["one_run"] = _jsonable(
            audit(
                log_probs[rows, canaries.audit_a],
                log_probs[rows, canaries.audit_b],
                canaries.audit_is_a,
                alpha,
            )
        )
    if result["memorization"] is None and result["one_run"] is None:
        result["notes"].append(NO_CANARIES)
    if metrics["delta"]:
        result["notes"].append(
            f"the run claims (ε, δ) with δ = {metrics['delta']:g}; the bounds here assume pure ε-DP"
        )
    result["label_inference"] = label_inference(
        outputs["train_sample"]["softmax"],
        outputs["train_sample"]["labels"],
        outputs["heldout"]["softmax"],
        outputs["heldout"]["labels"],
        metrics["epsilon"],
        metrics["delta"],
    )
    atomic_write_json(run_dir / "attack.json", result)
    return result


def format_table(results: list[dict[str, Any]]) -> str:
    """A plain-text table: method, ε, ε_LB (memorization), ε_LB (one run), label-inference gap."""

    def num(x: Any) -> str:
        if x is None:
            return "–"
        if isinstance(x, str):
            return "∞" if x == "inf" else x
        return f"{x:.2f}"

    header = ("run", "method", "ε", "ε_LB memorization", "ε_LB one-run", "label-inference gap")
    rows = [header]
    for r in results:
        rows.append(
            (
                Path(r["run"]).name,
                r["method"],
                "∞" if r["epsilon"] is None else f"{r['epsilon']:g}",
                num(r["memorization"]["epsilon_lb"]) if r["memorization"] else "–",
                num(r["one_run"]["epsilon_lb"]) if r["one_run"] else "–",
                f"{r['label_inference']['gap']:+.3f}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
