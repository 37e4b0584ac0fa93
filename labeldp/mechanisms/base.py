"""What every label mechanism shares: its privacy cost, in the ledger's form."""

from __future__ import annotations

from typing import Any, ClassVar

from ..privacy import LedgerEntry


class LabelMechanism:
    """A randomizer of labels that is (ε, δ)-label-DP per example it is applied to.

    Subclasses set ``name`` and the attributes ``epsilon`` (ε > 0) and ``delta``
    (δ in [0, 1)), and say in ``details()`` what else the ledger should record.
    """

    name: ClassVar[str]
    epsilon: float
    delta: float = 0.0

    def details(self) -> dict[str, Any]:
        return {}

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
        )
