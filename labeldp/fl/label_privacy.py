"""Local label DP at the clients: each example's label randomized once, charged once.

A client randomizes the labels of its examples before they leave its control: the
federation's updates, and everything after them, are post-processing of the released
labels. Each underlying example's label is released ONCE and reused in every later trip,
so the label-DP cost is the mechanism's ε per label whatever the number of participations
(releasing it again at every trip would compose: r participations, r·ε; the code has no
such path). When clients replicate examples (more simulated clients than examples), the
release is per example and every replica trains on the same released label.

Mechanisms (``kind``):

- "none": the true labels; no ledger entry (ε = ∞).
- "rr": randomized response (:class:`~labeldp.mechanisms.RandomizedResponse`). It does
  not depend on any model, so every label is drawn up front; that is the same
  distribution as drawing it at the client's first participation.
- "rr-prior": RRWithPrior (:class:`~labeldp.mechanisms.RRWithPrior`) with the prior the
  softmax of the model the client downloaded at the trip that first holds the example
  (:meth:`ClientLabels.release`, called before the trip trains; the downloaded model is
  public to the client). Drawn per trip from the trip's own stream.
- "alibi": ALIBI's noisy one-hot labels (:class:`~labeldp.mechanisms.Alibi`, Laplace),
  drawn up front; clients train on the posterior given their current local model
  (:class:`~labeldp.methods.alibi.AlibiTargets`).

Neighbouring relation: replace one label (of one example). This is the per-example label
guarantee; a user-level guarantee (:mod:`labeldp.fl.user_dp`) is another relation, in
another ledger, never added to this one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import ConfigError
from ..mechanisms import Alibi, RandomizedResponse, RRWithPrior
from ..methods.alibi import AlibiTargets
from ..privacy import PrivacyLedger
from ..train.targets import HardLabels, TargetFn

KINDS = ("none", "rr", "rr-prior", "alibi")


class _ReleasedLabels(TargetFn):
    """Hard targets read from the released labels; refuses an unreleased one."""

    uses_logits = False

    def __init__(self, owner: ClientLabels) -> None:
        self.owner = owner

    def __call__(self, indices: torch.Tensor, logits: torch.Tensor | None) -> torch.Tensor:
        if not bool(self.owner.released[indices].all()):
            raise RuntimeError("a client trained on a label it had not released (a bug)")
        return self.owner.noisy[indices]


class ClientLabels:
    """The labels the clients train on, each example's label released once.

    kind: one of ``KINDS``. epsilon: ε > 0 per label (ignored for "none"). labels: the
    true labels, int64 (N,). num_classes: K. generator: the noise of the up-front
    releases ("rr", "alibi"); "rr-prior" draws from the generator given to
    :meth:`release`.
    """

    def __init__(
        self,
        kind: str,
        epsilon: float | None,
        labels: torch.Tensor,
        num_classes: int,
        generator: torch.Generator | None = None,
    ) -> None:
        if kind not in KINDS:
            raise ConfigError(f"label privacy must be one of {', '.join(KINDS)}, got {kind!r}")
        if kind != "none" and epsilon is None:
            raise ConfigError(f"label privacy {kind!r} needs an epsilon > 0")
        self.kind, self.epsilon, self.num_classes = kind, epsilon, num_classes
        self.labels = labels
        n = len(labels)
        self.released = torch.ones(n, dtype=torch.bool, device=labels.device)
        self.mechanism = None
        if kind == "none":
            self.noisy = labels
        elif kind == "rr":
            self.mechanism = RandomizedResponse(epsilon, num_classes)
            self.noisy = self.mechanism.privatize(labels, generator)
        elif kind == "alibi":
            self.mechanism = Alibi(epsilon, num_classes)
            self.noisy = self.mechanism.privatize(labels, generator)
        else:
            self.mechanism = RRWithPrior(epsilon)
            self.noisy = torch.zeros_like(labels)
            self.released = torch.zeros(n, dtype=torch.bool, device=labels.device)

    @property
    def needs_prior(self) -> bool:
        """Whether :meth:`release` must run before a trip trains (the prior is a model)."""
        return self.kind == "rr-prior"

    def release(
        self,
        examples: torch.Tensor,
        prior: Callable[[torch.Tensor], torch.Tensor],
        generator: torch.Generator,
    ) -> int:
        """Releases the labels of ``examples`` (dataset indices) not released yet, with
        ``prior(indices)`` (probability rows (n, K) of the downloaded model); returns how
        many were released now. Nothing for kinds released up front."""
        if not self.needs_prior:
            return 0
        fresh = torch.unique(examples[~self.released[examples]])
        if len(fresh) == 0:
            return 0
        self.noisy[fresh] = self.mechanism.privatize(self.labels[fresh], prior(fresh), generator)
        self.released[fresh] = True
        return len(fresh)

    def apply(self, indices: torch.Tensor, values: torch.Tensor) -> None:
        """Records labels released elsewhere (e.g. by the simulation's driver, for a
        replica in a Ray actor): ``values`` become the released labels of ``indices``."""
        self.noisy[indices] = values.to(self.noisy.device)
        self.released[indices] = True

    def targets(self) -> TargetFn:
        """What the clients' loss reads: released hard labels, or ALIBI's posterior."""
        if self.kind == "none":
            return HardLabels(self.labels)
        if self.kind == "alibi":
            return AlibiTargets(self.mechanism, self.noisy, "model")
        if self.kind == "rr":
            return HardLabels(self.noisy)
        return _ReleasedLabels(self)

    def ledger(self) -> PrivacyLedger:
        """One entry: each label released once, under "replace one label"."""
        ledger = PrivacyLedger()
        if self.mechanism is not None:
            ledger.record(
                self.mechanism.ledger_entry(
                    examples=len(self.labels),
                    released="once per example, at the client, whatever the participations",
                )
            )
        return ledger

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"noisy": self.noisy, "released": self.released}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.noisy = state["noisy"].to(self.labels.device)
        self.released = state["released"].to(self.labels.device)
