"""Publishing PATE's data-dependent privacy cost: smooth sensitivity and the GNSS release.

The data-dependent RDP of Confident-GNMax (:mod:`labeldp.privacy.pate_accounting`) is a
function f(D) of the private votes: publishing it as it is would leak. Papernot et al.
(ICLR 2018, "Scalable Private Learning with PATE", Section 4.3 and Appendix C) publish
instead f(D) + SS_β(D)·σ_s·Z, Z ~ N(0, 1), where SS_β is a β-smooth upper bound on f's
local sensitivity; this "Gaussian noise with smooth sensitivity" (GNSS) release is itself
(λ, ε_GNSS)-RDP with (their Theorem 23), for 1 < λ < 1/(2β),

    ε_GNSS(λ) = λ·e^{2β}/σ_s² + (β·λ − ½·log(1 − 2λβ)) / (λ − 1).

Neighbouring datasets differ in one label, so one teacher moves its vote on every query.

Local sensitivities at distance d (histograms that d such moves reach), per query, and
summed over the queries (the sum's local sensitivity is at most the sum of theirs):

- threshold step: its data-dependent RDP depends on the maximum count v only, which moves
  by at most 1 per move; U(d) = max over v′ in [v − d, v + d] of the largest change of
  the RDP between v′ and v′ ± 1 (exact over those counts);
- GNMax: its RDP is g(q) for the bound q = min(1 − 1/K, Σ_{i≠top} Φ(−gap_i/(√2σ₂))) on
  Pr[answer ≠ plurality]. Within r moves every gap to the (possibly new) top lies in
  [max(0, gap_i − 2r), min(gap_i + 2r, N)] (matching the old top's slot to the new top's
  old gap), so q lies in [q_lo(r), q_hi(r)] computed from those gaps. With g
  non-decreasing in q (checked numerically on a dense grid for the given σ₂ and λ, the
  condition C5 of the paper; refused otherwise), every histogram within d and each of its
  neighbours (within d + 1) have RDP in [g(q_lo(d+1)), g(q_hi(d+1))]: U(d) is their
  difference. This is a looser bound than the paper's Algorithm 3 (about twice at d = 0)
  but needs no further conditions.

Both ranges nest (the range of a neighbour D′ at r + 1 contains that of D at r), so
SS_β(D) = max_d e^{−βd}·U_D(d) satisfies SS_β(D) ≥ LS(D) and SS_β(D) ≤ e^β·SS_β(D′):
a β-smooth upper bound, as the theorem needs. U is constant from d = N (teachers) on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.special import log_ndtr, logsumexp

from ..errors import ConfigError
from .pate_accounting import rdp_data_dependent_at_order


def gnss_rdp(beta: float, sigma_s: float, order: float) -> float:
    """ε_GNSS(λ) of the GNSS release with smoothness β > 0 and noise multiplier σ_s > 0
    (Papernot et al. 2018, Theorem 23); needs 1 < λ < 1/(2β)."""
    if not (beta > 0 and 1 < order < 1 / (2 * beta)):
        raise ConfigError(f"the GNSS release needs 1 < order < 1/(2β), got {order} and β {beta}")
    return order * math.exp(2 * beta) / sigma_s**2 + (
        beta * order - 0.5 * math.log(1 - 2 * order * beta)
    ) / (order - 1)


def gnss_sigma(beta: float, order: float, rdp: float) -> float:
    """The noise multiplier σ_s whose GNSS release costs ``rdp`` at ``order``; refuses an
    ``rdp`` at or below the part that no σ_s removes."""
    floor = (beta * order - 0.5 * math.log(1 - 2 * order * beta)) / (order - 1)
    if not rdp > floor:
        raise ConfigError(
            f"the smooth-sensitivity release needs more than {floor:.4g} RDP at order "
            f"{order:.4g}, got {rdp:.4g}: raise epsilon or release_share"
        )
    return math.sqrt(order * math.exp(2 * beta) / (rdp - floor))


def _log_q(gaps: np.ndarray, sigma2: float, num_classes: int) -> np.ndarray:
    """log q from the gaps (…, K − 1) of the top count over the others."""
    terms = log_ndtr(-gaps / (math.sqrt(2.0) * sigma2))
    return np.minimum(logsumexp(terms, axis=-1), math.log(1 - 1 / num_classes))


def check_monotone_gnmax(sigma2: float, order: float, num_classes: int) -> None:
    """Refuses (σ₂, λ) for which the data-dependent GNMax RDP g(q) is not non-decreasing
    in q on a dense grid up to the cap 1 − 1/K (the bound U(d) assumes it)."""
    cap = math.log(1 - 1 / num_classes)
    log_q = -np.logspace(math.log10(-cap), 7, 200_000)[::-1]
    g = rdp_data_dependent_at_order(log_q, sigma2, order)
    if np.any(np.diff(g) < -1e-12 * max(1.0, float(np.max(g)))):
        raise ConfigError(
            f"the data-dependent GNMax bound is not monotone for sigma2 {sigma2} at order "
            f"{order:.4g}; the smooth-sensitivity release is not available there"
        )


def gnmax_local_sensitivities(
    votes: np.ndarray, teachers: int, sigma2: float, order: float
) -> np.ndarray:
    """U(d), d = 0..N, for each query: (Q, N + 1) upper bounds on the local sensitivity
    of the GNMax data-dependent RDP at ``order`` over histograms within d moves."""
    votes = np.asarray(votes, dtype=np.float64)
    k = votes.shape[1]
    top = np.sort(votes, axis=1)[:, ::-1]
    gaps = top[:, :1] - top[:, 1:]  # (Q, K − 1), gaps of the top over the others
    r = np.arange(1, teachers + 2, dtype=np.float64)[None, :, None]  # d + 1
    low_gaps = np.maximum(gaps[:, None, :] - 2 * r, 0.0)
    high_gaps = np.minimum(gaps[:, None, :] + 2 * r, teachers)
    log_q_hi = _log_q(low_gaps, sigma2, k)
    log_q_lo = _log_q(high_gaps, sigma2, k)
    return rdp_data_dependent_at_order(log_q_hi, sigma2, order) - rdp_data_dependent_at_order(
        log_q_lo, sigma2, order
    )


def threshold_rdp_by_max_count(
    teachers: int, threshold: float, sigma1: float, order: float
) -> np.ndarray:
    """The threshold step's data-dependent RDP at ``order`` for every maximum count
    v = 0..N (noise √2·σ₁ and q = min(p, 1 − p), as in the accountant)."""
    v = np.arange(teachers + 1, dtype=np.float64)
    z = (v - threshold) / sigma1
    log_q = np.minimum(log_ndtr(z), log_ndtr(-z))
    return rdp_data_dependent_at_order(log_q, math.sqrt(2) * sigma1, order)


def threshold_local_sensitivities(
    votes: np.ndarray, teachers: int, threshold: float, sigma1: float, order: float
) -> np.ndarray:
    """U(d), d = 0..N, for each query: (Q, N + 1) local sensitivities of the threshold
    step's RDP over histograms within d moves (their maximum count is within ±d)."""
    rdp = threshold_rdp_by_max_count(teachers, threshold, sigma1, order)
    step = np.abs(np.diff(rdp))  # change between v and v + 1, v = 0..N − 1
    ls = np.zeros(teachers + 1)  # at maximum count v
    ls[:-1] = step
    ls[1:] = np.maximum(ls[1:], step)
    # table[v, d] = max of ls over [v − d, v + d] ∩ [0, N], grown one step at a time
    table = np.empty((teachers + 1, teachers + 1))
    table[:, 0] = ls
    padded = np.concatenate([np.zeros(teachers), ls, np.zeros(teachers)])
    v_all = np.arange(teachers + 1)
    for d in range(1, teachers + 1):
        edge = np.maximum(padded[v_all - d + teachers], padded[v_all + d + teachers])
        table[:, d] = np.maximum(table[:, d - 1], edge)
    v = np.asarray(votes).max(axis=1).astype(np.int64)
    return table[v]


def smooth_sensitivity(local: np.ndarray, beta: float) -> float:
    """SS_β = max_d e^{−βd}·U(d) for U(d), d = 0..N (constant beyond N)."""
    d = np.arange(len(local))
    return float(np.max(np.exp(-beta * d) * local))


@dataclass(frozen=True)
class SmoothSensitivityRelease:
    """A published data-dependent privacy cost of one Confident-GNMax transcript.

    order: the Rényi order λ (fixed in advance: the filter's). rdp_noisy: the released
    f(D) + SS·σ_s·Z (RDP at λ). smooth_sensitivity: SS_β (a diagnostic: it depends on the
    votes). noise_std: SS·σ_s, the release's noise (diagnostic). release_rdp: ε_GNSS(λ),
    fixed in advance. epsilon: the publishable data-dependent ε at ``delta``:
    rdp_noisy + release_rdp converted at λ (Balle et al. 2020); noisy, and not a
    worst-case guarantee (that is the filter's budget)."""

    order: float
    beta: float
    sigma_s: float
    rdp_noisy: float
    smooth_sensitivity: float
    noise_std: float
    release_rdp: float
    epsilon: float
    delta: float


def release(
    votes: np.ndarray,
    answered: np.ndarray,
    teachers: int,
    threshold: float,
    sigma1: float,
    sigma2: float,
    order: float,
    beta: float,
    sigma_s: float,
    delta: float,
    z: float,
) -> SmoothSensitivityRelease:
    """The GNSS release of the data-dependent RDP at ``order`` of a transcript: ``votes``
    (Q, K) of the queries considered, ``answered`` (Q,) flags; ``z`` a N(0, 1) draw."""
    votes = np.asarray(votes, dtype=np.float64)
    answered = np.asarray(answered, dtype=bool)
    check_monotone_gnmax(sigma2, order, votes.shape[1])
    release_rdp = gnss_rdp(beta, sigma_s, order)
    local = np.zeros(teachers + 1)
    rdp = 0.0
    if len(votes):
        z1 = (votes.max(axis=1) - threshold) / sigma1
        log_q1 = np.minimum(log_ndtr(z1), log_ndtr(-z1))
        rdp += float(np.sum(rdp_data_dependent_at_order(log_q1, math.sqrt(2) * sigma1, order)))
        local += threshold_local_sensitivities(votes, teachers, threshold, sigma1, order).sum(0)
        if answered.any():
            top = np.sort(votes[answered], axis=1)[:, ::-1]
            log_q2 = _log_q(top[:, :1] - top[:, 1:], sigma2, votes.shape[1])
            rdp += float(np.sum(rdp_data_dependent_at_order(log_q2, sigma2, order)))
            local += gnmax_local_sensitivities(votes[answered], teachers, sigma2, order).sum(0)
    ss = smooth_sensitivity(local, beta)
    noisy = rdp + ss * sigma_s * z
    a = order
    epsilon = (
        noisy + release_rdp + math.log((a - 1) / a) - (math.log(delta) + math.log(a)) / (a - 1)
    )
    return SmoothSensitivityRelease(
        order=order,
        beta=beta,
        sigma_s=sigma_s,
        rdp_noisy=noisy,
        smooth_sensitivity=ss,
        noise_std=ss * sigma_s,
        release_rdp=release_rdp,
        epsilon=max(0.0, epsilon),
        delta=delta,
    )
