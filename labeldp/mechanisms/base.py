"""What every label mechanism shares: its privacy cost, in the ledger's form."""

from __future__ import annotations

from typing import Any, ClassVar

import dp_accounting

from ..privacy import LedgerEntry, Neighbouring


class LabelMechanism:
    """A randomizer of labels that is (ε, δ)-label-DP per example it is applied to: its
    neighbouring relation is "replace one label" (``relation``).

    Subclasses set ``name`` and the attributes ``epsilon`` (ε > 0) and ``delta``
    (δ in [0, 1)), give their dp-accounting event in ``dp_event()`` (with
    ``event_note()`` saying whether it is exact), and say in ``details()`` what else the
    ledger should record.
    """

    name: ClassVar[str]
    relation: ClassVar[Neighbouring] = Neighbouring.REPLACE_ONE_LABEL
    epsilon: float
    delta: float = 0.0

    def details(self) -> dict[str, Any]:
        return {}

    def dp_event(self) -> dp_accounting.DpEvent:
        """The dp-accounting event of one application to one label, under
        ``relation`` (dp-accounting's REPLACE_ONE)."""
        raise NotImplementedError

    def event_note(self) -> str:
        """How :meth:`dp_event` describes the mechanism (exact, or a dominating pair)."""
        return ""

    def ledger_entry(
        self, examples: int, composition: str = "sequential", group: str = "", **details: Any
    ) -> LedgerEntry:
        """The ledger entry for one application of this mechanism to ``examples`` labels
        (each label randomized once)."""
        return LedgerEntry(
            mechanism=self.name,
            epsilon=self.epsilon,
            delta=self.delta,
            examples=examples,
            composition=composition,
            group=group,
            details={**self.details(), **details},
            relation=self.relation,
            event=self.dp_event(),
            event_note=self.event_note(),
        )
