"""Confident-GNMax (Papernot et al. 2018): PATE's noisy aggregation of teacher votes.

Spec: shared/specs/pate_fixmatch.md, step 4. For a query with vote histogram n ∈ ℕ^K:

1. threshold step: answer only if max_j n_j + N(0, σ₁²) ≥ T. The noise goes on the
   maximum count only — the mechanism the accountant analyses. (Adding threshold noise to
   every count and taking the maximum is a different mechanism.)
2. if answered: the label is argmax_j (n_j + N(0, σ₂²)), fresh noise on every count.

:class:`ConfidentGNMax` answers queries in order and records every query's votes, whether
it was answered and the label given. With a budget ε it runs a Rényi privacy filter
(:mod:`labeldp.privacy.renyi_filter`) on the *data-independent* cost of each step —
λ/(2σ₁²) for a threshold check, λ/σ₂² for an answer — which depends only on public
parameters and on the released outcome "answered" of earlier queries. It stops before the
first step the filter does not admit. The run is then (ε, δ)-DP for the budget, whatever
the votes. The data-dependent ε of Papernot et al. (2018) is computed too and reported as
what it is: a function of the private votes, smaller, but not a guarantee that can be
published (that needs its smooth-sensitivity release).

Stopping on the data-dependent cost, as an earlier version did, is not a filter: whether
a query is answered then depends deterministically on the private votes (two neighbouring
histograms [100, 0, …] and [99, 1, …] could give an answer with probability 0.77 and 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy import integrate
from scipy.stats import norm

from ..errors import ConfigError
from ..privacy.pate_accounting import ORDERS, pate_rdp, rdp_to_epsilon
from ..privacy.renyi_filter import RenyiFilter, best_order_for_linear_costs
from .randomness import check_source, standard_normal


@dataclass
class Aggregation:
    """What Confident-GNMax did, query by query.

    votes: (Q, K) int64 vote counts of every query considered. answered: (Q,) bool.
    labels: (Q,) int64, the label given, −1 where not answered.
    epsilon: the guarantee at ``delta`` (label DP, replace one label) of the aggregation
        together with any step paid from its ``reserve``: the smaller of the filter's
        budget and the data-independent ε of answering every query of the pool (both fixed
        before any vote is looked at). With a reserve, the second bound does not cover the
        reserved step: use the budget.
    epsilon_data_dependent: the data-dependent ε (Papernot et al. 2018) of what was done
        (threshold steps of all Q queries plus the answers). It depends on the private
        votes: a diagnostic, not a guarantee.
    stopped_by_budget: True if the filter stopped before the end of the pool (then
        queries after the last one considered were never looked at).
    filter_order: the Rényi order of the filter (None without a budget).
    """

    votes: np.ndarray
    answered: np.ndarray
    labels: np.ndarray
    epsilon: float
    delta: float
    stopped_by_budget: bool
    epsilon_data_dependent: float = 0.0
    filter_order: float | None = None


class ConfidentGNMax:
    """Confident-GNMax with threshold ``threshold`` T (in votes), threshold noise
    ``sigma1`` σ₁ and argmax noise ``sigma2`` σ₂ (standard deviations, in votes).
    secure: noise from OS entropy instead of a generator."""

    def __init__(
        self, threshold: float, sigma1: float, sigma2: float, secure: bool = False
    ) -> None:
        for name, value in (("sigma1", sigma1), ("sigma2", sigma2)):
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{name} must be a finite number > 0, got {value}")
        if not math.isfinite(threshold):
            raise ConfigError(f"threshold must be a finite number, got {threshold}")
        self.threshold = float(threshold)
        self.sigma1 = float(sigma1)
        self.sigma2 = float(sigma2)
        self.secure = bool(secure)

    # ------------------------------------------------------------ exact probabilities
    def answer_probability(self, votes: np.ndarray) -> float:
        """Pr[max_j n_j + N(0, σ₁²) ≥ T] for one histogram."""
        return float(norm.sf((self.threshold - np.max(votes)) / self.sigma1))

    def label_probabilities(self, votes: np.ndarray) -> np.ndarray:
        """Pr[argmax_j (n_j + N(0, σ₂²)) = i] for every class i, by quadrature:
        ∫ φ(z) Π_{j≠i} Φ(z + (n_i − n_j)/σ₂) dz."""
        votes = np.asarray(votes, dtype=np.float64)
        probs = np.empty(len(votes))
        for i in range(len(votes)):
            gaps = (votes[i] - np.delete(votes, i)) / self.sigma2

            def integrand(z: float, gaps: np.ndarray = gaps) -> float:
                return float(norm.pdf(z) * np.prod(norm.cdf(z + gaps)))

            probs[i] = integrate.quad(integrand, -np.inf, np.inf, epsabs=1e-12)[0]
        return probs / probs.sum()

    # -------------------------------------------------------------------- aggregation
    def step_costs(self, order: float) -> tuple[float, float]:
        """Data-independent RDP at ``order`` of one threshold check (a Gaussian mechanism
        on the maximum count, sensitivity 1) and of one answer (GNMax: λ/σ₂²)."""
        return order / (2 * self.sigma1**2), order / self.sigma2**2

    @staticmethod
    def filter_order(budget: float, delta: float) -> float:
        """The Rényi order of the filter for an (ε, δ) budget, fixed from public values
        (the best single order for Gaussian costs)."""
        return best_order_for_linear_costs(budget, delta)

    def worst_case_epsilon(self, queries: int, delta: float) -> float:
        """Data-independent ε at ``delta`` of ``queries`` threshold checks, all answered:
        a bound fixed before any vote is seen."""
        check, answer = self.step_costs(1.0)
        return rdp_to_epsilon(queries * (check + answer) * ORDERS, delta)

    def aggregate(
        self,
        votes: np.ndarray,
        generator: torch.Generator | None = None,
        budget: float | None = None,
        delta: float = 1e-5,
        reserve: float = 0.0,
    ) -> Aggregation:
        """Answers the queries (rows of ``votes``, (Q, K) counts) in order.

        generator: a CPU torch.Generator for the noise (None with ``secure``).
        budget: ε budget at ``delta``: a Rényi filter on the data-independent cost of
        each step (public information only) stops before the first threshold check or
        answer it does not admit. None: answer every query that passes the threshold
        (the guarantee is then the data-independent ε of answering all Q).
        reserve: RDP at the filter's order (:meth:`filter_order`) held back from the
        budget for a later step whose cost is fixed in advance (the smooth-sensitivity
        release of the data-dependent cost); 0 without one."""
        check_source(generator, self.secure)
        votes = np.asarray(votes)
        if votes.ndim != 2 or votes.shape[1] < 2 or np.any(votes < 0):
            raise ConfigError(
                f"votes must be a (queries, classes ≥ 2) array of counts ≥ 0, got {votes.shape}"
            )
        if budget is not None and not (math.isfinite(budget) and budget > 0):
            raise ConfigError(f"budget must be a finite ε > 0 or None, got {budget}")
        if not 0 < delta < 1:
            raise ConfigError(f"delta must be in (0, 1), got {delta}")
        q, k = votes.shape
        # All noise drawn up front (one stream, fixed layout) so the outcome of query i
        # does not depend on how many draws earlier queries used.
        threshold_noise = standard_normal((q,), generator=generator, secure=self.secure)
        argmax_noise = standard_normal((q, k), generator=generator, secure=self.secure)
        answered = np.zeros(q, dtype=bool)
        labels = np.full(q, -1, dtype=np.int64)
        privacy_filter, check_cost, answer_cost = None, 0.0, 0.0
        if budget is not None:
            order = self.filter_order(budget, delta)
            privacy_filter = RenyiFilter(budget, delta, order)
            check_cost, answer_cost = self.step_costs(order)
            if reserve:
                if not (0 < reserve and privacy_filter.admits(reserve)):
                    raise ConfigError(
                        f"reserve must be in (0, {privacy_filter.budget:.4g}] (the RDP "
                        f"budget at order {order:.4g}), got {reserve}"
                    )
                privacy_filter.spend(reserve)
        elif reserve:
            raise ConfigError("reserve needs a budget")
        considered, stopped = q, False
        # The loop reads the votes only inside the two noisy tests: every decision to
        # stop depends on public parameters and on earlier released outcomes.
        for i in range(q):
            if privacy_filter is not None:
                if not privacy_filter.admits(check_cost):
                    considered, stopped = i, True
                    break
                privacy_filter.spend(check_cost)
            counts = votes[i].astype(np.float64)
            if counts.max() + self.sigma1 * float(threshold_noise[i]) < self.threshold:
                continue
            if privacy_filter is not None:
                if not privacy_filter.admits(answer_cost):
                    considered, stopped = i + 1, True
                    break
                privacy_filter.spend(answer_cost)
            noisy = counts + self.sigma2 * argmax_noise[i].numpy()
            answered[i] = True
            labels[i] = int(np.argmax(noisy))
        guarantee = self.worst_case_epsilon(q, delta)
        if budget is not None:
            guarantee = min(guarantee, budget)
        kept = votes[:considered].astype(np.int64)
        data_dependent = (
            rdp_to_epsilon(
                pate_rdp(kept, answered[:considered], self.threshold, self.sigma1, self.sigma2),
                delta,
            )
            if considered
            else 0.0
        )
        return Aggregation(
            votes=kept,
            answered=answered[:considered],
            labels=labels[:considered],
            epsilon=guarantee,
            delta=delta,
            stopped_by_budget=stopped,
            epsilon_data_dependent=data_dependent,
            filter_order=privacy_filter.order if privacy_filter is not None else None,
        )
