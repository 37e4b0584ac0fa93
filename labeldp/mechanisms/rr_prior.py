"""RRTop-k and RRWithPrior (Ghazi, Golowich, Kumar, Manurangsi, Zhang, NeurIPS 2021,
Algorithms 1–2)."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import dp_accounting
import torch

from ..privacy.events import pure_dp_event
from .base import LabelMechanism
from .randomness import check_source, uniform
from .validation import check_epsilon, check_labels, check_prior


class RRWithPrior(LabelMechanism):
    """Randomized response restricted to the k labels of highest prior, with k chosen per
    example to maximize the probability of returning the true label.

    For a prior p sorted descending, p₍₁₎ ≥ … ≥ p₍K₎, and k = 1..K (the size of the set):
    w_k = e^ε / (e^ε + k − 1) · (p₍₁₎ + … + p₍ₖ₎), k* = argmax_k w_k (the smallest on
    ties). RRTop-k*: a true label inside the top set is kept with probability
    e^ε/(e^ε + k* − 1), else replaced by another member uniformly; a true label outside
    it is replaced by a uniform member of the set. ε-label-DP for any prior that does
    not depend on the label being randomized.

    epsilon: ε > 0, finite. secure: draw from OS entropy.
    """

    name: ClassVar[str] = "rr-with-prior"

    def __init__(self, epsilon: float, secure: bool = False) -> None:
        self.epsilon = check_epsilon(epsilon)
        self.secure = bool(secure)
        self.delta = 0.0

    def details(self) -> dict[str, Any]:
        return {"secure": self.secure}

    def dp_event(self) -> dp_accounting.DpEvent:
        """Binary RR at ε (:func:`~labeldp.privacy.events.pure_dp_event`), which dominates
        this pure ε-DP mechanism. No event is exact: k* changes with the prior from one
        example to the next, and for a given k* the mechanism is k*-ary RR on the set for
        labels inside it but a uniform draw from the set for labels outside (k* = 1: a
        constant), which no dp-accounting event describes."""
        return pure_dp_event(self.epsilon)

    def event_note(self) -> str:
        return (
            "dominating pair, not exact: binary randomized response at ε bounds every "
            "ε-DP mechanism (Kairouz, Oh & Viswanath 2015); RRTop-k* with k* chosen per "
            "example from the prior has no exact dp-accounting event"
        )

    def _keep_probabilities(self, k: torch.Tensor) -> torch.Tensor:
        """e^ε / (e^ε + k − 1) for set sizes k (float64), computed stably."""
        return 1.0 / (1.0 + (k.double() - 1.0) * math.exp(-self.epsilon))

    def _sorted(self, prior: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(order, k*): classes by decreasing prior (stable), and the optimal set size."""
        values, order = torch.sort(prior.double(), dim=1, descending=True, stable=True)
        sizes = torch.arange(1, prior.shape[1] + 1, device=prior.device)
        weights = self._keep_probabilities(sizes) * values.cumsum(dim=1)
        return order, weights.argmax(dim=1) + 1

    def top_sets(self, prior: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The top-k* set of each row of ``prior`` (N, K): ``(members, k)`` with
        ``members`` bool (N, K) (class c is in row i's set) and ``k`` int64 (N,) in 1..K.

        The uniform prior gives k* = K, the set of all classes, for every ε > 0: with
        p₍ⱼ₎ = 1/K, w_k = k/K · e^ε/(e^ε + k − 1) and
        w_{k+1}/w_k = (k + 1 + (k² − 1)e^{−ε}) / (k + k²e^{−ε}) > 1, since the numerator
        minus the denominator is 1 − e^{−ε} > 0. RRTop-K is then exactly k-ary RR (keep
        y with probability e^ε/(e^ε + K − 1), else another class uniformly), and
        :meth:`privatize` draws it from the same variates as
        :class:`~labeldp.mechanisms.RandomizedResponse` (identity order, same offsets)."""
        prior = check_prior(prior)
        order, k = self._sorted(prior)
        return torch.argsort(order, dim=1) < k[:, None], k

    def release_estimates(self, rr_labels: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
        """Per example, an unbiased estimate of Pr[RRWithPrior(y, prior) = y] from an RR
        output ỹ of the same (unseen) true label y: float64 (N,), each of absolute value
        at most (e^ε + K − 1)/(e^ε − 1) (not a probability itself, it may be negative;
        its mean over many examples estimates their mean release probability).

        rr_labels: int64 (N,), outputs of k-ary RR at this mechanism's ε over the K
        classes of ``prior`` (N, K). The prior must not depend on ỹ (e.g. a model that
        did not train on these examples); it may depend on anything else.

        With p = e^ε/(e^ε + K − 1), q = 1/(e^ε + K − 1) and Y the top-k* set of the
        prior (size k), the estimate is

            ê = (1{ỹ ∈ Y} − k·q) / (p − q) · e^ε / (e^ε + k − 1).

        Unbiasedness: given y and Y, RR outputs y with probability p and each other class
        with probability q, so Pr[ỹ ∈ Y] = Σ_{c ∈ Y} Pr[ỹ = c] = (k − 1{y ∈ Y})·q +
        1{y ∈ Y}·p = k·q + (p − q)·1{y ∈ Y}. Hence E[(1{ỹ ∈ Y} − k·q)/(p − q)] = 1{y ∈ Y}
        (p − q = (e^ε − 1)/(e^ε + K − 1) > 0 for ε > 0), and E[ê] = 1{y ∈ Y} ·
        e^ε/(e^ε + k − 1), which is Pr[RRTop-k(y) = y]: inside Y the true label is kept
        with that probability, outside Y it is never output. Computed as
        (1{ỹ ∈ Y} − (k − K·1{ỹ ∈ Y}) / (e^ε − 1)) · e^ε/(e^ε + k − 1), the same value
        (use q/(p − q) = 1/(e^ε − 1) and 1 − p + q = K·q), with 1/(e^ε − 1) taken as
        e^{−ε}/(1 − e^{−ε}), which does not overflow. A set of all K classes (e.g. the
        uniform prior) gives ê = e^ε/(e^ε + K − 1) = p exactly, RR's keep probability,
        whatever ỹ."""
        rows = rr_labels.shape[0] if isinstance(rr_labels, torch.Tensor) else None
        prior = check_prior(prior, rows)
        rr_labels = check_labels(rr_labels, prior.shape[1])
        members, k = self.top_sets(prior)
        inside = members.gather(1, rr_labels[:, None])[:, 0].double()
        ratio = math.exp(-self.epsilon) / -math.expm1(-self.epsilon)  # q / (p − q)
        indicator = inside - (k.double() - prior.shape[1] * inside) * ratio
        return indicator * self._keep_probabilities(k)

    def optimal_k(self, prior: torch.Tensor) -> torch.Tensor:
        """k* for each row of ``prior`` (N, K): int64 (N,), values in 1..K."""
        return self._sorted(check_prior(prior))[1]

    def in_top_set(self, labels: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
        """Whether each label lies in the top-k* set of its prior row: bool (N,)."""
        prior = check_prior(prior, labels.shape[0] if isinstance(labels, torch.Tensor) else None)
        labels = check_labels(labels, prior.shape[1])
        order, k = self._sorted(prior)
        return torch.argsort(order, dim=1).gather(1, labels[:, None])[:, 0] < k

    def output_probabilities(self, labels: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
        """The exact output distribution for each (label, prior) row: float64 (N, K)."""
        prior = check_prior(prior, labels.shape[0] if isinstance(labels, torch.Tensor) else None)
        labels = check_labels(labels, prior.shape[1])
        order, k = self._sorted(prior)
        n, num_classes = prior.shape
        rank = torch.argsort(order, dim=1)  # rank[i, c] = position of class c
        in_set = rank < k[:, None]
        keep = self._keep_probabilities(k)[:, None]
        label_inside = rank.gather(1, labels[:, None]) < k[:, None]
        # Members of the set share what the true label does not keep (label inside), or
        # all of it equally (label outside); classes outside the set get nothing.
        member = torch.where(
            label_inside, (1 - keep) / (k[:, None] - 1).clamp(min=1), 1.0 / k[:, None]
        )
        probs = in_set.double() * member
        rows = torch.arange(n, device=prior.device)[label_inside[:, 0]]
        probs[rows, labels[rows]] = keep[rows, 0]
        return probs

    def privatize(
        self, labels: torch.Tensor, prior: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Randomizes each label once given its prior row: int64 (N,), values in 0..K−1."""
        prior = check_prior(prior, labels.shape[0] if isinstance(labels, torch.Tensor) else None)
        labels = check_labels(labels, prior.shape[1])
        check_source(generator, self.secure)
        order, k = self._sorted(prior)
        n, device = labels.shape[0], labels.device
        u = uniform((2, n), generator=generator, secure=self.secure, device=device)
        rank = torch.argsort(order, dim=1).gather(1, labels[:, None])[:, 0]
        inside = rank < k
        keep = inside & (u[0] < self._keep_probabilities(k))
        # Inside, not kept: another member, uniformly (an offset in 1..k−1 modulo k).
        offset = 1 + (u[1] * (k - 1)).long().clamp_(max=(k - 2).clamp(min=0))
        swapped = (rank + offset) % k
        # Outside: a uniform member of the top-k set.
        anywhere = (u[1] * k).long().clamp_(max=k - 1)
        new_rank = torch.where(keep, rank, torch.where(inside, swapped, anywhere))
        return order.gather(1, new_rank[:, None])[:, 0]
