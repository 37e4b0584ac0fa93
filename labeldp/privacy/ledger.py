"""The privacy ledger: the one place that says what a run cost.

A ledger is a list of entries, one per mechanism application (randomized response on
a stage's labels, the Laplace noise of ALIBI, the composed steps of DP-SGD, ...). Each
entry records which mechanism, its (ε, δ), the neighbouring relation that (ε, δ) is for,
its dp-accounting ``DpEvent``, how many examples it touched and how it composes with the
others. The run's ε and δ are derived from the entries, never stored beside them. A run
with no entry is non-private: ε = ∞ (written as null in JSON).

All entries of one ledger share one relation: the ledger refuses an entry stated for
another one (adding ε's of different relations would be a number about no pair of
datasets), so the run's ε is always under the one relation ``to_dict()["relation"]``.

Ledgers stored before entries had a relation and an event (metrics.json of older runs)
have neither key; readers take the method's relation for them (see
``attacks.harness.relation``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import dp_accounting

from ..errors import ConfigError
from ..records import number_to_json
from .events import event_to_dict
from .neighbouring import Neighbouring, parse_relation

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
    relation (keyword, required): the :class:`Neighbouring` relation (ε, δ) is for.
    event (keyword, required): the dp-accounting ``DpEvent`` of this application, stated
        for ``relation`` (dp-accounting's PLD accountant reading it under
        ``relation.dp_accounting_relation`` gives at most about ``epsilon`` at ``delta``),
        or ``UnsupportedDpEvent()`` when no fixed composition of events describes the
        guarantee.
    event_note (keyword): how ``event`` relates to the mechanism ("exact", a dominating
        pair, ...); required, the reason, when ``event`` is ``UnsupportedDpEvent``.
    """

    mechanism: str
    epsilon: float
    delta: float = 0.0
    examples: int = 0
    composition: str = "sequential"
    group: str = ""
    details: dict[str, Any] = field(default_factory=dict)
    condition: str = ""
    relation: Neighbouring = field(kw_only=True)
    event: dp_accounting.DpEvent = field(kw_only=True)
    event_note: str = field(default="", kw_only=True)

    def __post_init__(self) -> None:
        object.__setattr__(self, "relation", parse_relation(self.relation))
        if not isinstance(self.event, dp_accounting.DpEvent):
            raise ConfigError(
                f"event must be a dp_accounting DpEvent, got {type(self.event).__name__}"
            )
        if isinstance(self.event, dp_accounting.UnsupportedDpEvent) and not self.event_note:
            raise ConfigError("an entry with UnsupportedDpEvent must say why in event_note")
        if not (math.isfinite(self.epsilon) and self.epsilon >= 0):
            raise ConfigError(f"epsilon must be finite and ≥ 0, got {self.epsilon}")
        if not 0 <= self.delta < 1:
            raise ConfigError(f"delta must be in [0, 1), got {self.delta}")
        if self.composition not in COMPOSITIONS:
            raise ConfigError(
                f"composition must be one of {COMPOSITIONS}, got {self.composition!r}"
            )
        if self.composition == "parallel" and not self.group:
            raise ConfigError(
                "a parallel entry needs a group naming the disjoint parts it belongs to"
            )


class PrivacyLedger:
    """Collects :class:`LedgerEntry` items of one neighbouring relation and composes them
    (basic composition: ε and δ add across sequential entries and across parallel groups;
    a parallel group costs the maximum over its entries). An accountant that composes more
    tightly records its result as a single entry."""

    def __init__(self) -> None:
        self.entries: list[LedgerEntry] = []

    @property
    def relation(self) -> Neighbouring | None:
        """The relation of every entry; None while the ledger is empty."""
        return self.entries[0].relation if self.entries else None

    def record(self, entry: LedgerEntry) -> None:
        """Adds ``entry``; a ValueError, adding nothing, if its relation is not the one of
        the entries already recorded."""
        if self.entries and entry.relation is not self.relation:
            raise ConfigError(
                f"cannot add an entry for '{entry.relation.value}' ({entry.mechanism}) to a "
                f"ledger of '{self.relation.value}' entries: ε's of different neighbouring "
                "relations do not add up to an ε of either"
            )
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
        """The ledger as JSON-able data: ``epsilon`` ("Infinity" when non-private: the
        convention of labeldp.records; older files wrote None), ``delta`` (None then),
        ``relation`` (the relation's string; None when non-private), ``composition`` and
        ``entries`` (each with its ``relation`` string and its ``event`` as
        :func:`~labeldp.privacy.events.event_to_dict` writes it)."""
        eps = self.epsilon
        return {
            "epsilon": number_to_json(eps),
            "delta": self.delta,
            "relation": None if self.relation is None else self.relation.value,
            "composition": "basic (sequential sums, parallel groups take the maximum)",
            "entries": [entry_to_dict(e) for e in self.entries],
        }


def entry_to_dict(entry: LedgerEntry) -> dict[str, Any]:
    """``entry`` as JSON-able data (its relation as its string, its event as a dict)."""
    data = asdict(replace(entry, event=dp_accounting.NoOpDpEvent()))
    return {**data, "relation": entry.relation.value, "event": event_to_dict(entry.event)}
