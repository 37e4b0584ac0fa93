"""Data-dependent Rényi-DP accounting of Confident-GNMax (PATE; Papernot et al. 2018).

Spec: shared/specs/pate_fixmatch.md, "Privacy analysis". Changing one training label
changes one teacher, which moves one vote from one class to another: the vote histogram
moves by L2 distance √2 and its maximum by at most 1.

Per query with votes n ∈ ℕ^K (one row of ``votes``):

- threshold step (every query): is max_j n_j + N(0, σ₁²) ≥ T? A Gaussian mechanism on
  the maximum (sensitivity 1): data-independent RDP λ / (2σ₁²); data-dependent: the bound
  below with q = min(p, 1 − p), p = Pr[answered], and noise √2·σ₁.
- GNMax (answered queries only): argmax_j (n_j + N(0, σ₂²)). Data-independent RDP λ/σ₂²;
  data-dependent: the bound below with q = Pr[output ≠ plurality class] bounded by
  Σ_{i≠i*} Pr[N(0, 2σ₂²) ≥ n_{i*} − n_i], capped at 1 − 1/K.

The data-dependent bound (their Theorem 6 / Proposition 7) at order λ, with
μ₂ = σ·sqrt(log(1/q)), μ₁ = μ₂ + 1, ε₁ = μ₁/σ², ε₂ = μ₂/σ², valid when μ₁ > λ, μ₂ > 1,
log(1/q) > ε₂ and log q ≤ (μ₂ − 1)ε₂ − μ₂(log(1 + 1/(μ₁ − 1)) + log(1 + 1/(μ₂ − 1))):

    RDP_λ ≤ 1/(λ − 1) · log((1 − q)·A^{λ−1} + q·B^{λ−1}),
    A = (1 − q) / (1 − (q·e^{ε₂})^{(μ₂−1)/μ₂}),   B = e^{ε₁} / q^{1/(μ₁−1)},

and the smaller of it and the data-independent value is used (the data-independent one
where the conditions fail). RDP adds over queries at every order; (ε, δ) follows by the
conversion of Balle et al. (2020). Everything is in log space.

The result depends on the private votes: it is a *data-dependent* ε, not a release-safe
one (that would need the smooth-sensitivity analysis of the same paper, Section 4.3).
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import log_ndtr, logsumexp

from ..errors import ConfigError

#: Rényi orders λ > 1 at which RDP is evaluated and the (ε, δ) conversion minimized.
ORDERS = np.concatenate([np.linspace(1.1, 10.9, 50), np.arange(11.0, 100.0), np.logspace(2, 4, 60)])


def _log1mexp(x: np.ndarray | float) -> np.ndarray | float:
    """log(1 − e^x) for x < 0, accurately (Mächler 2012)."""
    x = np.asarray(x, dtype=np.float64)
    return np.where(x > -math.log(2), np.log(-np.expm1(x)), np.log1p(-np.exp(x)))


def log_q_gnmax(votes: np.ndarray, sigma2: float) -> float:
    """log of the bound on Pr[GNMax(votes) ≠ plurality class] with noise σ₂ per count:
    log Σ_{i≠i*} Pr[N(0, 2σ₂²) ≥ n_{i*} − n_i], capped at log(1 − 1/K)."""
    votes = np.asarray(votes, dtype=np.float64)
    top = int(np.argmax(votes))
    gaps = votes[top] - np.delete(votes, top)
    log_terms = log_ndtr(-gaps / (math.sqrt(2.0) * sigma2))
    return float(min(logsumexp(log_terms), math.log(1 - 1 / len(votes))))


def log_p_answered(votes: np.ndarray, threshold: float, sigma1: float) -> tuple[float, float]:
    """(log p, log(1 − p)) for p = Pr[max_j n_j + N(0, σ₁²) ≥ T], each accurate."""
    z = (np.max(votes) - threshold) / sigma1
    return float(log_ndtr(z)), float(log_ndtr(-z))


def rdp_data_dependent(log_q: float, sigma: float, orders: np.ndarray = ORDERS) -> np.ndarray:
    """RDP at ``orders`` of a Gaussian-noise argmax whose probability of not returning
    the most likely answer is at most q = e^{log_q}; noise σ (GNMax: σ₂; threshold step:
    √2·σ₁). Never above the data-independent λ/σ²."""
    orders = np.asarray(orders, dtype=np.float64)
    independent = orders / sigma**2
    if not log_q < 0:
        return independent
    variance = sigma**2
    mu2 = math.sqrt(variance * -log_q)
    mu1 = mu2 + 1
    eps1, eps2 = mu1 / variance, mu2 / variance
    if not (mu2 > 1 and -log_q > eps2):
        return independent
    limit = (mu2 - 1) * eps2 - mu2 * (math.log1p(1 / (mu1 - 1)) + math.log1p(1 / (mu2 - 1)))
    if log_q > limit:
        return independent
    valid = mu1 > orders
    log_1mq = float(_log1mexp(log_q))
    log_a = log_1mq - _log1mexp((log_q + eps2) * (1 - 1 / mu2))
    log_b = eps1 - log_q / (mu1 - 1)
    lam = orders[valid]
    bound = np.logaddexp(log_1mq + (lam - 1) * log_a, log_q + (lam - 1) * log_b) / (lam - 1)
    out = independent.copy()
    out[valid] = np.minimum(independent[valid], bound)
    return out


def rdp_data_dependent_at_order(log_q: np.ndarray, sigma: float, order: float) -> np.ndarray:
    """:func:`rdp_data_dependent` at one order λ for an array of log q values at once
    (elementwise the same numbers; used by the smooth-sensitivity analysis)."""
    log_q = np.asarray(log_q, dtype=np.float64)
    variance = sigma**2
    independent = np.full(log_q.shape, order / variance)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        mu2 = np.sqrt(variance * np.maximum(-log_q, 0.0))
        mu1 = mu2 + 1
        eps2 = mu2 / variance
        limit = (mu2 - 1) * eps2 - mu2 * (np.log1p(1 / (mu1 - 1)) + np.log1p(1 / (mu2 - 1)))
        valid = (log_q < 0) & (mu2 > 1) & (-log_q > eps2) & (log_q <= limit) & (mu1 > order)
        lq = np.where(valid, log_q, -1.0)
        m1, m2 = np.where(valid, mu1, 3.0), np.where(valid, mu2, 2.0)
        e1, e2 = m1 / variance, m2 / variance
        log_1mq = _log1mexp(lq)
        log_a = log_1mq - _log1mexp((lq + e2) * (1 - 1 / m2))
        log_b = e1 - lq / (m1 - 1)
        bound = np.logaddexp(log_1mq + (order - 1) * log_a, lq + (order - 1) * log_b) / (order - 1)
    return np.where(valid, np.minimum(independent, bound), independent)


def _check(votes, answered, threshold, sigma1, sigma2, delta):
    votes = np.asarray(votes)
    if votes.ndim != 2 or votes.shape[1] < 2:
        raise ConfigError(f"votes must be a (queries, classes ≥ 2) array, got {votes.shape}")
    if np.any(votes < 0) or not np.all(np.isfinite(votes)):
        raise ConfigError("votes must be finite counts ≥ 0")
    answered = np.asarray(answered, dtype=bool)
    if answered.shape != (votes.shape[0],):
        raise ConfigError(
            f"answered must have one flag per query ({votes.shape[0]}), got {answered.shape}"
        )
    for name, value in (("sigma1", sigma1), ("sigma2", sigma2)):
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{name} must be a finite number > 0, got {value}")
    if threshold is not None and not math.isfinite(threshold):
        raise ConfigError(f"threshold must be a finite number or None, got {threshold}")
    if not 0 < delta < 1:
        raise ConfigError(f"delta must be in (0, 1), got {delta}")
    return votes.astype(np.float64), answered


def pate_rdp(
    votes: np.ndarray,
    answered: np.ndarray,
    threshold: float | None,
    sigma1: float,
    sigma2: float,
    data_dependent: bool = True,
    orders: np.ndarray = ORDERS,
) -> np.ndarray:
    """Total RDP at ``orders`` of Confident-GNMax over all queries.

    votes: (Q, K) vote counts per query. answered: (Q,) whether each query was answered.
    threshold: T, or None for plain GNMax (every query answered, no threshold step).
    sigma1, sigma2: threshold and argmax noise standard deviations (in votes).
    data_dependent: False gives the data-independent bound (λ/(2σ₁²) per query plus
    λ/σ₂² per answer)."""
    orders = np.asarray(orders, dtype=np.float64)
    total = np.zeros_like(orders)
    for counts, was_answered in zip(votes, answered, strict=True):
        if threshold is not None:
            if data_dependent:
                log_q = min(log_p_answered(counts, threshold, sigma1))  # q = min(p, 1 − p)
                total += rdp_data_dependent(log_q, math.sqrt(2) * sigma1, orders)
            else:
                total += orders / (2 * sigma1**2)
        if was_answered:
            if data_dependent:
                total += rdp_data_dependent(log_q_gnmax(counts, sigma2), sigma2, orders)
            else:
                total += orders / sigma2**2
    return total


def rdp_to_epsilon(rdp: np.ndarray, delta: float, orders: np.ndarray = ORDERS) -> float:
    """(ε, δ) from RDP curve ``rdp`` at ``orders`` (Balle et al. 2020, Theorem 21):
    ε = min_λ RDP_λ + log((λ − 1)/λ) − (log δ + log λ)/(λ − 1)."""
    orders = np.asarray(orders, dtype=np.float64)
    eps = rdp + np.log((orders - 1) / orders) - (math.log(delta) + np.log(orders)) / (orders - 1)
    return float(max(0.0, np.min(eps)))


def pate_epsilon(
    votes: np.ndarray,
    answered: np.ndarray,
    threshold: float | None,
    sigma1: float,
    sigma2: float,
    delta: float,
    data_dependent: bool = True,
) -> float:
    """ε at ``delta`` of Confident-GNMax on these votes (label DP: one label changes one
    teacher's vote). Data-dependent by default: it is a function of the private votes.

    votes: (Q, K) counts; answered: (Q,) bools; threshold: T in votes (None: plain
    GNMax); sigma1, sigma2: noise standard deviations in votes; delta in (0, 1)."""
    votes, answered = _check(votes, answered, threshold, sigma1, sigma2, delta)
    rdp = pate_rdp(votes, answered, threshold, sigma1, sigma2, data_dependent)
    return rdp_to_epsilon(rdp, delta)
