"""The privacy ledger: the one place that says what a run cost.

A ledger is a list of entries, one per mechanism application (randomized response on
a stage's labels, the Laplace noise of ALIBI, the composed steps of DP-SGD, ...). Each
entry records which mechanism, its (ε, δ), how many examples it touched and how it
composes with the others. The run's ε and δ are derived from the entries, never stored
beside them. A run with no entry is non-private: ε = ∞ (written as null in JSON).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

COMPOSITIONS = ("parallel", "sequential")


@dataclass(frozen=True)
class LedgerEntry:
    """One mechanism application.

    mechanism: its name, e.g. "randomized-response".
    epsilon: ε ≥ 0 of the mechanism for every example it touched (per example, label DP).
    delta: δ in [0, 1).
    examples: how many training examples it touched (≥ 0).
    composition: "parallel" if it touched examples that no other "parallel" entry of the
        same group touched (costs add per example, so the group costs its maximum), or
        "sequential" if it composes with everything else (costs add up).
    group: entries of one parallel group share a name (e.g. the stages of LP-MST).
    details: free-form, JSON-able facts (parameters, accountant used, ...).
    condition: what the guarantee assumes beyond the mechanism, e.g. that a seeded run's
        seed stays secret; empty when nothing.
    """

    mechanism: str
    epsilon: float
    delta: float = 0.0
    examples: int = 0
    composition: str = "sequential"
    group: str = ""
    details: dict[str, Any] = field(default_factory=dict)
    condition: str = ""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.epsilon) and self.epsilon >= 0):
            raise ValueError(f"epsilon must be finite and ≥ 0, got {self.epsilon}")
        if not 0 <= self.delta < 1:
            raise ValueError(f"delta must be in [0, 1), got {self.delta}")
        if self.composition not in COMPOSITIONS:
            raise ValueError(f"composition must be one of {COMPOSITIONS}, got {self.composition!r}")
        if self.composition == "parallel" and not self.group:
            raise ValueError(
                "a parallel entry needs a group naming the disjoint parts it belongs to"
            )


class PrivacyLedger:
    """Collects :class:`LedgerEntry` items and composes them (basic composition: ε and δ
    add across sequential entries and across parallel groups; a parallel group costs the
    maximum over its entries). An accountant that composes more tightly records its
    result as a single entry."""

    def __init__(self) -> None:
        self.entries: list[LedgerEntry] = []

    def record(self, entry: LedgerEntry) -> None:
        self.entries.append(entry)

    def with_condition(self, condition: str) -> PrivacyLedger:
        """A new ledger whose every entry states ``condition`` (appended to any it has)."""
        out = PrivacyLedger()
        for e in self.entries:
            text = f"{e.condition}; {condition}" if e.condition else condition
            out.record(replace(e, condition=text))
        return out

    @property
    def is_private(self) -> bool:
        return bool(self.entries)

    def _costs(self) -> list[tuple[float, float]]:
        groups: dict[str, list[LedgerEntry]] = {}
        costs = []
        for e in self.entries:
            if e.composition == "parallel":
                groups.setdefault(e.group, []).append(e)
            else:
                costs.append((e.epsilon, e.delta))
        for members in groups.values():
            costs.append((max(e.epsilon for e in members), max(e.delta for e in members)))
        return costs

    @property
    def epsilon(self) -> float:
        """Total ε of the run (label DP); ``math.inf`` for a non-private run."""
        return sum(c[0] for c in self._costs()) if self.entries else math.inf

    @property
    def delta(self) -> float | None:
        """Total δ; None for a non-private run."""
        return sum(c[1] for c in self._costs()) if self.entries else None

    def to_dict(self) -> dict[str, Any]:
        eps = self.epsilon
        return {
            "epsilon": None if math.isinf(eps) else eps,
            "delta": self.delta,
            "composition": "basic (sequential sums, parallel groups take the maximum)",
            "entries": [asdict(e) for e in self.entries],
        }
