"""RR ("LP-1ST"): every training label randomized once by k-ary randomized response."""

from __future__ import annotations

from typing import Any, ClassVar

from ..mechanisms import RandomizedResponse
from ..mechanisms.validation import check_epsilon
from ..privacy import PrivacyLedger
from ..seeding import Stream
from ..train import HardLabels
from .base import MethodResult, RunContext


class RandomizedResponseMethod:
    """Randomizes each training label once with RR at ``epsilon`` (pure ε-label-DP), then
    trains on the noisy labels every epoch.

    epsilon: ε > 0 per label. secure_noise: draw from OS entropy instead of the run seed.
    """

    name: ClassVar[str] = "rr"

    def __init__(self, epsilon: float, secure_noise: bool = False) -> None:
        self.epsilon = check_epsilon(epsilon)
        self.secure_noise = bool(secure_noise)

    def options(self) -> dict[str, Any]:
        return {"epsilon": self.epsilon, "secure_noise": self.secure_noise}

    def run(self, ctx: RunContext) -> MethodResult:
        labels = ctx.train.labels
        mechanism = RandomizedResponse(
            self.epsilon, ctx.train.info.num_classes, secure=self.secure_noise
        )
        generator = None if self.secure_noise else ctx.generator(Stream.RR_NOISE)
        noisy = ctx.privatized("rr", lambda: mechanism.privatize(labels, generator))
        ledger = PrivacyLedger()
        ledger.record(mechanism.ledger_entry(examples=len(noisy)))
        return MethodResult(fit=ctx.fit(HardLabels(noisy)), ledger=ledger)
