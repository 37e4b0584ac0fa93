"""Non-private training on the true labels: the ε = ∞ reference."""

from __future__ import annotations

from typing import Any, ClassVar

from ..privacy import PrivacyLedger
from ..train import HardLabels
from .base import Method, MethodResult, RunContext


class NonPrivate(Method):
    """Trains on the true labels. The ledger stays empty: ε = ∞, no guarantee."""

    name: ClassVar[str] = "none"

    def options(self) -> dict[str, Any]:
        return {}

    def run(self, ctx: RunContext) -> MethodResult:
        fit = ctx.fit(HardLabels(ctx.train.labels))
        return MethodResult(fit=fit, ledger=PrivacyLedger())
