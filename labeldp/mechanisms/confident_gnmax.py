"""Confident-GNMax (Papernot et al. 2018): PATE's noisy aggregation of teacher votes.

Spec: shared/specs/pate_fixmatch.md, step 4. For a query with vote histogram n ∈ ℕ^K:

1. threshold step: answer only if max_j n_j + N(0, σ₁²) ≥ T. The noise goes on the
   maximum count only — the mechanism the accountant analyses. (Adding threshold noise to
   every count and taking the maximum is a different mechanism.)
2. if answered: the label is argmax_j (n_j + N(0, σ₂²)), fresh noise on every count.

:class:`ConfidentGNMax` answers queries in order and records every query's votes, whether
it was answered and the label given. With a budget ε it stops before the first step that
would take the data-dependent ε (:mod:`labeldp.privacy.pate_accounting`) above it. That
stopping rule itself depends on the private votes — as in the PATE papers, the reported
ε is data-dependent and the stopping point is not separately accounted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy import integrate
from scipy.stats import norm

from ..errors import ConfigError
from ..privacy.pate_accounting import (
    ORDERS,
    log_p_answered,
    log_q_gnmax,
    rdp_data_dependent,
    rdp_to_epsilon,
)
from .randomness import check_source, standard_normal


@dataclass
class Aggregation:
    """What Confident-GNMax did, query by query.

    votes: (Q, K) int64 vote counts of every query considered. answered: (Q,) bool.
    labels: (Q,) int64, the label given, −1 where not answered. epsilon: data-dependent ε
    at ``delta`` of everything done (threshold steps of all Q queries plus the answers).
    stopped_by_budget: True if answering stopped early because of the budget (then
    queries after the last one considered were never looked at).
    """

    votes: np.ndarray
    answered: np.ndarray
    labels: np.ndarray
    epsilon: float
    delta: float
    stopped_by_budget: bool


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
    def aggregate(
        self,
        votes: np.ndarray,
        generator: torch.Generator | None = None,
        budget: float | None = None,
        delta: float = 1e-5,
    ) -> Aggregation:
        """Answers the queries (rows of ``votes``, (Q, K) counts) in order.

        generator: a CPU torch.Generator for the noise (None with ``secure``).
        budget: ε budget at ``delta``; stop before the step (threshold check or answer)
        that would take the data-dependent ε above it. None: answer every query that
        passes the threshold."""
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
        rdp = np.zeros_like(ORDERS)
        considered, stopped = q, False
        for i in range(q):
            counts = votes[i].astype(np.float64)
            cost = rdp_data_dependent(
                min(log_p_answered(counts, self.threshold, self.sigma1)),
                math.sqrt(2) * self.sigma1,
            )
            if budget is not None and rdp_to_epsilon(rdp + cost, delta) > budget:
                considered, stopped = i, True
                break
            rdp += cost
            if counts.max() + self.sigma1 * float(threshold_noise[i]) < self.threshold:
                continue
            cost = rdp_data_dependent(log_q_gnmax(counts, self.sigma2), self.sigma2)
            if budget is not None and rdp_to_epsilon(rdp + cost, delta) > budget:
                considered, stopped = i + 1, True
                break
            rdp += cost
            noisy = counts + self.sigma2 * argmax_noise[i].numpy()
            answered[i] = True
            labels[i] = int(np.argmax(noisy))
        return Aggregation(
            votes=votes[:considered].astype(np.int64),
            answered=answered[:considered],
            labels=labels[:considered],
            epsilon=rdp_to_epsilon(rdp, delta),
            delta=delta,
            stopped_by_budget=stopped,
        )
