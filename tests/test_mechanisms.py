"""Label mechanisms against independent computations: the spec's formulas, a linear
program over all ε-DP randomizers, brute-force Bayes, and sampling with statistical tests.

Every statistical test uses fixed seeds, so it is deterministic; sample sizes are large
enough that a wrong probability (say a denominator e^ε + k − 2 instead of e^ε + k − 1)
fails by a wide margin.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import optimize, stats

from labeldp.mechanisms import Alibi, RandomizedResponse, RRWithPrior, gaussian_sigma

P_MIN = 1e-4  # reject "matches" below this p-value (fixed seeds: no flakiness)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _random_prior(k: int, rng: np.random.Generator, concentration: float = 0.5) -> torch.Tensor:
    return torch.from_numpy(rng.dirichlet(np.full(k, concentration)))


def _chi_square_pvalue(samples: torch.Tensor, probs: torch.Tensor) -> float:
    """Goodness of fit of integer samples to a distribution (cells with p = 0 must be empty)."""
    k = probs.numel()
    counts = torch.bincount(samples, minlength=k).double().numpy()
    p = probs.double().numpy()
    assert counts[p == 0].sum() == 0, "a sample fell where the probability is 0"
    mask = p > 0
    if mask.sum() == 1:  # a deterministic output: every sample in that cell (checked above)
        return 1.0
    return stats.chisquare(counts[mask], counts.sum() * p[mask] / p[mask].sum()).pvalue


# --------------------------------------------------------------------------- RR
def _rr_matrix(eps: float, k: int) -> np.ndarray:
    """The spec's RR distribution, written independently of the implementation."""
    keep = math.exp(eps) / (math.exp(eps) + k - 1)
    m = np.full((k, k), (1 - keep) / (k - 1))
    np.fill_diagonal(m, keep)
    return m


@pytest.mark.parametrize("k", [2, 5, 10])
@pytest.mark.parametrize("eps", [0.5, 1.0, 4.0])
def test_rr_frequencies_match_the_exact_distribution(k, eps):
    rr = RandomizedResponse(eps, k)
    expected = torch.from_numpy(_rr_matrix(eps, k))
    torch.testing.assert_close(rr.output_probabilities(torch.arange(k)), expected)
    for y in range(k):
        noisy = rr.privatize(torch.full((40_000,), y), generator=_gen(100 * k + y))
        assert _chi_square_pvalue(noisy, expected[y]) > P_MIN


@pytest.mark.parametrize("k", [2, 3, 10])
@pytest.mark.parametrize("eps", [0.1, 1.0, 8.0])
def test_rr_likelihood_ratio_is_at_most_e_to_the_epsilon(k, eps):
    m = RandomizedResponse(eps, k).output_probabilities(torch.arange(k))
    ratios = m[:, None, :] / m[None, :, :]
    assert ratios.max().item() <= math.exp(eps) * (1 + 1e-12)
    assert ratios.max().item() == pytest.approx(math.exp(eps))  # and tight


def test_rr_secure_mode_has_the_same_distribution_and_refuses_a_generator():
    rr = RandomizedResponse(1.0, 4, secure=True)
    noisy = rr.privatize(torch.zeros(40_000, dtype=torch.long))
    assert _chi_square_pvalue(noisy, torch.from_numpy(_rr_matrix(1.0, 4))[0]) > P_MIN
    assert not torch.equal(noisy, rr.privatize(torch.zeros(40_000, dtype=torch.long)))
    with pytest.raises(ValueError, match="generator must be None"):
        rr.privatize(torch.zeros(3, dtype=torch.long), generator=_gen(0))


def test_rr_is_reproducible_with_a_seed():
    rr = RandomizedResponse(1.0, 10)
    labels = torch.arange(1000) % 10
    assert torch.equal(rr.privatize(labels, _gen(1)), rr.privatize(labels, _gen(1)))
    assert not torch.equal(rr.privatize(labels, _gen(1)), rr.privatize(labels, _gen(2)))


# ------------------------------------------------------------------ RRWithPrior
def _spec_k_star(prior: np.ndarray, eps: float) -> tuple[int, float]:
    """k* and w_{k*} by the spec's formula, 1-based sizes, smallest k on ties."""
    p = np.sort(prior)[::-1]
    weights = [math.exp(eps) / (math.exp(eps) + k - 1) * p[:k].sum() for k in range(1, len(p) + 1)]
    best = int(np.argmax(weights))
    return best + 1, weights[best]


def _lp_optimum(prior: np.ndarray, eps: float) -> float:
    """max over all ε-DP randomizers M (K×K row-stochastic, M[y,o] ≤ e^ε M[y',o]) of
    Pr[M(y) = y] for y ~ prior, by scipy's linear programming."""
    k = len(prior)
    index = lambda y, o: y * k + o  # noqa: E731
    c = np.zeros(k * k)
    for y in range(k):
        c[index(y, y)] = -prior[y]
    rows = []
    for o in range(k):
        for y in range(k):
            for y2 in range(k):
                if y != y2:
                    row = np.zeros(k * k)
                    row[index(y, o)] = 1.0
                    row[index(y2, o)] = -math.exp(eps)
                    rows.append(row)
    a_eq = np.zeros((k, k * k))
    for y in range(k):
        a_eq[y, y * k : (y + 1) * k] = 1.0
    result = optimize.linprog(
        c,
        A_ub=np.array(rows),
        b_ub=np.zeros(len(rows)),
        A_eq=a_eq,
        b_eq=np.ones(k),
        bounds=(0, 1),
        method="highs",
    )
    assert result.status == 0
    return -result.fun


@pytest.mark.parametrize("k", [2, 3, 5, 10])
@pytest.mark.parametrize("eps", [0.25, 1.0, 2.0, 5.0])
def test_rr_with_prior_attains_the_linear_program_optimum(k, eps):
    rng = np.random.default_rng(1000 * k + int(eps * 100))
    mech = RRWithPrior(eps)
    for _ in range(3):
        prior = _random_prior(k, rng)
        m = mech.output_probabilities(torch.arange(k), prior.expand(k, k))
        ours = float((prior * m.diagonal()).sum())
        optimum = _lp_optimum(prior.numpy(), eps)
        assert ours == pytest.approx(optimum, rel=1e-6, abs=1e-9)
        assert ours == pytest.approx(_spec_k_star(prior.numpy(), eps)[1], rel=1e-9)


def test_optimal_k_matches_the_spec_and_not_the_off_by_one_variant():
    rng = np.random.default_rng(7)
    mech = RRWithPrior(1.0)
    priors = torch.stack([_random_prior(10, rng, 0.3) for _ in range(400)])
    ours = mech.optimal_k(priors)
    spec = torch.tensor([_spec_k_star(p.numpy(), 1.0)[0] for p in priors])
    assert torch.equal(ours, spec)

    def off_by_one(p: np.ndarray) -> int:  # the known public-implementation pitfall
        p = np.sort(p)[::-1]
        w = [math.exp(1.0) / (math.exp(1.0) + max(k - 2, 0)) * p[:k].sum() for k in range(1, 11)]
        return int(np.argmax(w)) + 1

    wrong = torch.tensor([off_by_one(p.numpy()) for p in priors])
    assert (wrong != spec).any()  # the test above would catch that variant


@pytest.mark.parametrize("k", [2, 5, 10])
@pytest.mark.parametrize("eps", [0.5, 2.0])
def test_rr_with_prior_is_epsilon_dp_for_every_prior(k, eps):
    rng = np.random.default_rng(k)
    mech = RRWithPrior(eps)
    for concentration in (0.1, 1.0, 10.0):
        prior = _random_prior(k, rng, concentration)
        m = mech.output_probabilities(torch.arange(k), prior.expand(k, k))
        torch.testing.assert_close(m.sum(1), torch.ones(k, dtype=torch.float64))
        for o in range(k):
            column = m[:, o]
            if column.max() == 0:
                continue
            assert column.min() > 0, "an output reachable from one label must be from all"
            assert (column.max() / column.min()).item() <= math.exp(eps) * (1 + 1e-12)


@pytest.mark.parametrize("k", [3, 10])
def test_rr_with_prior_frequencies_match_the_exact_distribution(k):
    rng = np.random.default_rng(11 * k)
    mech = RRWithPrior(1.0)
    for trial in range(3):
        prior = _random_prior(k, rng)
        for y in range(k):
            labels = torch.full((20_000,), y)
            noisy = mech.privatize(
                labels, prior.expand(20_000, k).float(), generator=_gen(trial * 100 + y)
            )
            expected = mech.output_probabilities(torch.tensor([y]), prior[None])[0]
            assert _chi_square_pvalue(noisy, expected) > P_MIN


def test_rr_with_prior_uniform_prior_is_plain_rr():
    k, eps = 6, 1.3
    m = RRWithPrior(eps).output_probabilities(torch.arange(k), torch.full((k, k), 1 / k))
    torch.testing.assert_close(m, torch.from_numpy(_rr_matrix(eps, k)))


# ----------------------------------------------------------------------- ALIBI
@pytest.mark.parametrize("eps", [0.5, 1.0, 4.0])
def test_alibi_laplace_noise_has_scale_two_over_epsilon(eps):
    mech = Alibi(eps, 10)
    labels = torch.arange(20_000) % 10
    noise = (mech.privatize(labels, _gen(3)) - torch.nn.functional.one_hot(labels, 10)).double()
    b = 2.0 / eps
    assert mech.scale == pytest.approx(b)
    sample = noise.flatten().numpy()
    assert stats.kstest(sample, stats.laplace(scale=b).cdf).pvalue > P_MIN
    # Sample moments: mean 0 and variance 2b² within 5 standard errors.
    n = sample.size
    assert abs(sample.mean()) < 5 * math.sqrt(2) * b / math.sqrt(n)
    var_se = math.sqrt((24 * b**4 - 4 * b**4) / n)  # Var of x²: E x⁴ − (E x²)² = 24b⁴ − 4b⁴
    assert abs(sample.var() - 2 * b**2) < 5 * var_se
    # A mis-scaled mechanism (b = 1/ε) would be rejected.
    assert stats.kstest(sample, stats.laplace(scale=1 / eps).cdf).pvalue < 1e-10


def _analytic_gaussian_delta(sigma: float, eps: float, sensitivity: float) -> float:
    """δ of the Gaussian mechanism (Balle & Wang 2018, Theorem 8), by scipy."""
    a = sensitivity / (2 * sigma)
    b = eps * sigma / sensitivity
    return stats.norm.cdf(a - b) - math.exp(eps) * stats.norm.cdf(-a - b)


@pytest.mark.parametrize("eps,delta", [(0.5, 1e-5), (1.0, 1e-5), (4.0, 1e-6), (2.0, 1e-3)])
def test_alibi_gaussian_calibration_is_exact(eps, delta):
    s = gaussian_sigma(eps, delta)
    assert _analytic_gaussian_delta(s, eps, math.sqrt(2)) <= delta * (1 + 1e-6)
    assert _analytic_gaussian_delta(s * 0.999, eps, math.sqrt(2)) > delta  # and tight
    mech = Alibi(eps, 10, noise="gaussian", delta=delta)
    labels = torch.arange(20_000) % 10
    noise = (mech.privatize(labels, _gen(4)) - torch.nn.functional.one_hot(labels, 10)).double()
    assert stats.kstest(noise.flatten().numpy(), stats.norm(scale=s).cdf).pvalue > P_MIN


def _brute_force_posterior(noisy: np.ndarray, prior: np.ndarray, density) -> np.ndarray:
    n, k = noisy.shape
    out = np.zeros((n, k))
    for i in range(n):
        for c in range(k):
            onehot = np.eye(k)[c]
            out[i, c] = prior[i, c] * np.prod(density(noisy[i] - onehot))
        out[i] /= out[i].sum()
    return out


@pytest.mark.parametrize("noise", ["laplace", "gaussian"])
@pytest.mark.parametrize("eps", [1.0, 3.0])
def test_alibi_posterior_equals_brute_force_bayes(noise, eps):
    k = 5
    mech = Alibi(eps, k, noise=noise, delta=1e-5 if noise == "gaussian" else None)
    rng = np.random.default_rng(int(eps * 10) + len(noise))
    labels = torch.from_numpy(rng.integers(0, k, 50))
    noisy = mech.privatize(labels, _gen(5))
    prior = torch.from_numpy(rng.dirichlet(np.ones(k), 50))
    density = (
        stats.laplace(scale=mech.scale).pdf
        if noise == "laplace"
        else stats.norm(scale=mech.scale).pdf
    )
    expected = _brute_force_posterior(noisy.double().numpy(), prior.numpy(), density)
    ours = mech.posterior(noisy, prior.float())
    torch.testing.assert_close(ours.double(), torch.from_numpy(expected), atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(ours.sum(1), torch.ones(50))
    uniform = _brute_force_posterior(noisy.double().numpy(), np.full((50, k), 1 / k), density)
    torch.testing.assert_close(
        mech.posterior(noisy).double(), torch.from_numpy(uniform), atol=2e-5, rtol=1e-4
    )


def test_alibi_gaussian_posterior_is_not_the_divide_by_s_variant():
    # The known public-implementation pitfall divides by s instead of s²; at s ≠ 1 the
    # brute-force comparison above separates them.
    mech = Alibi(1.0, 3, noise="gaussian", delta=1e-5)
    assert abs(mech.scale - 1) > 0.5
    noisy = torch.tensor([[0.9, 0.1, -0.2]])
    wrong = torch.softmax(noisy / mech.scale, dim=1)
    assert not torch.allclose(mech.posterior(noisy), wrong, atol=1e-3)


# ------------------------------------------------------------------- arguments
@pytest.mark.parametrize("bad", [0, -1.0, float("inf"), float("nan"), "1", True])
def test_bad_epsilon_is_refused(bad):
    for build in (
        lambda: RandomizedResponse(bad, 3),
        lambda: RRWithPrior(bad),
        lambda: Alibi(bad, 3),
    ):
        with pytest.raises(ValueError, match="epsilon must be a finite number > 0"):
            build()


def test_bad_labels_priors_and_options_are_refused():
    rr = RandomizedResponse(1.0, 3)
    with pytest.raises(ValueError, match=r"labels must lie in 0\.\.2"):
        rr.privatize(torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="labels must lie in"):
        rr.privatize(torch.tensor([-1]))
    with pytest.raises(ValueError, match="integer class indices"):
        rr.privatize(torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="num_classes must be an integer ≥ 2"):
        RandomizedResponse(1.0, 1)
    mech = RRWithPrior(1.0)
    labels = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="prior must have one row per label"):
        mech.privatize(labels, torch.full((3, 3), 1 / 3))
    with pytest.raises(ValueError, match="prior must be a float tensor of shape"):
        mech.privatize(labels, torch.full((2,), 0.5))
    with pytest.raises(ValueError, match="≥ 0"):
        mech.privatize(labels, torch.tensor([[1.5, -0.5], [0.5, 0.5]]))
    with pytest.raises(ValueError, match="rows must sum to 1"):
        mech.privatize(labels, torch.tensor([[0.5, 0.6], [0.5, 0.5]]))
    with pytest.raises(ValueError, match=r"labels must lie in 0\.\.1"):
        mech.privatize(torch.tensor([0, 2]), torch.full((2, 2), 0.5))
    with pytest.raises(ValueError, match="noise must be one of"):
        Alibi(1.0, 3, noise="cauchy")
    with pytest.raises(ValueError, match=r"delta must be in \(0, 1\)"):
        Alibi(1.0, 3, noise="gaussian")
    with pytest.raises(ValueError, match="delta must be None for Laplace"):
        Alibi(1.0, 3, delta=1e-5)


def test_each_mechanism_states_its_cost_for_the_ledger():
    entry = RandomizedResponse(2.0, 10).ledger_entry(examples=500)
    assert (entry.mechanism, entry.epsilon, entry.delta, entry.examples) == (
        "randomized-response",
        2.0,
        0.0,
        500,
    )
    entry = Alibi(1.0, 10, noise="gaussian", delta=1e-5).ledger_entry(examples=7, group="g")
    assert entry.delta == 1e-5 and entry.details["noise"] == "gaussian"
    assert (
        RRWithPrior(0.5).ledger_entry(3, composition="parallel", group="lp").composition
        == "parallel"
    )
    # label mechanisms: replace one label; each entry carries its event (tests/test_ledger.py
    # checks every event's ε against the mechanism's)
    for mech in (RandomizedResponse(2.0, 10), RRWithPrior(0.5), Alibi(1.0, 10)):
        entry = mech.ledger_entry(examples=1)
        assert entry.relation.value == "replace one label"
        assert entry.event == mech.dp_event() and entry.event_note
