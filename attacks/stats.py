"""Exact binomial statistics behind every ε lower bound.

Under ε-label-DP, a distinguisher between "trained with label a" and "trained with
label b" is right with probability at most e^ε / (1 + e^ε), and over independent
canaries its number of correct guesses v out of r is stochastically dominated by
Binomial(r, e^ε / (1 + e^ε)) (Steinke, Nasr, Jagielski 2023). The p-value of "the model
is ε-DP" is Pr[Binomial(r, e^ε/(1+e^ε)) ≥ v]; ε_LB at level α is the largest ε whose
p-value is ≤ α. That equals the log-odds of the exact one-sided Clopper–Pearson lower
confidence bound on the success rate, which is how it is computed here.
"""

from __future__ import annotations

import math

from scipy import stats

from labeldp.errors import ConfigError, check_int


def _check_counts(num_guesses: int, num_correct: int, alpha: float) -> None:
    check_int("num_guesses", num_guesses, 0)
    if (
        isinstance(num_correct, bool)
        or not isinstance(num_correct, int)
        or not 0 <= num_correct <= num_guesses
    ):
        raise ConfigError(
            f"num_correct must be an integer in 0..num_guesses={num_guesses}, got {num_correct!r}"
        )
    if not 0 < alpha < 1:
        raise ConfigError(f"alpha must be in (0, 1), got {alpha}")


def clopper_pearson_lower(num_trials: int, num_successes: int, alpha: float = 0.05) -> float:
    """Exact one-sided (1 − α) lower confidence bound on a binomial success rate: the p
    with Pr[Binomial(n, p) ≥ v] = α (0 when v = 0)."""
    _check_counts(num_trials, num_successes, alpha)
    if num_successes == 0:
        return 0.0
    return float(stats.beta.ppf(alpha, num_successes, num_trials - num_successes + 1))


def clopper_pearson_upper(num_trials: int, num_successes: int, alpha: float = 0.05) -> float:
    """Exact one-sided (1 − α) upper confidence bound (1 when v = n)."""
    _check_counts(num_trials, num_successes, alpha)
    if num_successes == num_trials:
        return 1.0
    return float(stats.beta.ppf(1 - alpha, num_successes + 1, num_trials - num_successes))


def dp_p_value(num_guesses: int, num_correct: int, epsilon: float) -> float:
    """Pr[Binomial(r, e^ε/(1+e^ε)) ≥ v]: the p-value of "the model is ε-DP" given v correct
    guesses out of r."""
    _check_counts(num_guesses, num_correct, 0.5)
    p = 1.0 / (1.0 + math.exp(-epsilon))
    return float(stats.binom.sf(num_correct - 1, num_guesses, p))


def epsilon_lower_bound(num_guesses: int, num_correct: int, alpha: float = 0.05) -> float:
    """The largest ε ≥ 0 rejected at level α by v = ``num_correct`` right guesses out of
    r = ``num_guesses`` (0 when even ε = 0 is not rejected).

    The p-value Pr[Binomial(r, e^ε/(1+e^ε)) ≥ v] increases with ε, so the rejected set is
    [0, ε_LB); its end is logit of the Clopper–Pearson lower bound on v/r.
    """
    _check_counts(num_guesses, num_correct, alpha)
    if num_guesses == 0:
        return 0.0
    low = clopper_pearson_lower(num_guesses, num_correct, alpha)
    if low <= 0.5:
        return 0.0
    if low >= 1.0:
        return math.inf
    return math.log(low / (1.0 - low))


def epsilon_lower_bound_cap(num_guesses: int, alpha: float = 0.05) -> float:
    """The largest ε_LB that ``num_guesses`` guesses can give at level α: the bound of a
    perfect attack (every guess right), logit(α^(1/r)). It grows with r, so an attack that
    abstains never beats it. A claimed ε at or above it cannot be refuted by r guesses:
    "ε_LB ≤ ε" then holds whatever the model leaks."""
    return epsilon_lower_bound(num_guesses, num_guesses, alpha)


def epsilon_point_estimate(num_guesses: int, num_correct: int) -> float | None:
    """log(acc / (1 − acc)) of the observed accuracy: no confidence, for reference only
    (None without guesses; ±inf at accuracy 1 or 0)."""
    _check_counts(num_guesses, num_correct, 0.5)
    if num_guesses == 0:
        return None
    if num_correct == num_guesses:
        return math.inf
    if num_correct == 0:
        return -math.inf
    return math.log(num_correct / (num_guesses - num_correct))


def epsilon_from_error_rates(
    true_positives: int,
    positives: int,
    false_positives: int,
    negatives: int,
    delta: float = 0.0,
    alpha: float = 0.05,
) -> float:
    """ε lower bound from a distinguisher's error rates (hypothesis-testing view):
    (ε, δ)-DP implies TPR ≤ e^ε·FPR + δ and TNR ≤ e^ε·FNR + δ. Uses a Clopper–Pearson
    lower bound for each numerator rate and an upper bound for each denominator rate, with
    a Bonferroni split of α over the four bounds; returns the larger of the two bounds
    (0 when neither is informative)."""
    a = alpha / 4
    tpr = clopper_pearson_lower(positives, true_positives, a)
    fpr = clopper_pearson_upper(negatives, false_positives, a)
    tnr = clopper_pearson_lower(negatives, negatives - false_positives, a)
    fnr = clopper_pearson_upper(positives, positives - true_positives, a)
    bounds = [0.0]
    for numerator, denominator in ((tpr, fpr), (tnr, fnr)):
        if numerator - delta > 0 and denominator > 0:
            bounds.append(math.log((numerator - delta) / denominator))
    return max(bounds)
