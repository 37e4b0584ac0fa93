"""User-level DP for the federated buffer (labeldp.fl.user_dp): clipping, the noise of a
flush (its standard deviation on the K-sum is σ·C, whatever the normalizer), and the
accounting against independent computations: the classic RDP-to-(ε, δ) bound from
above and the exact ε of the Gaussian mechanism (Balle & Wang 2018) from below."""

from __future__ import annotations

import math

import dp_accounting
import pytest
import torch
from scipy import optimize, stats

from labeldp.errors import ConfigError
from labeldp.fl.user_dp import (
    RELATION,
    clip_update,
    clip_updates,
    flush_noise,
    user_level_epsilon,
    user_level_event,
)
from labeldp.privacy import Accountant, Neighbouring, event_from_dict, event_to_dict


# ------------------------------------------------------------------------- clipping
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_clipped_norm_is_at_most_c(dtype):
    g = torch.Generator().manual_seed(0)
    for scale, max_norm in [(1.0, 0.5), (100.0, 3.0), (1e-2, 1e-2), (1.0, 7.0)]:
        delta = (torch.randn(5000, generator=g) * scale).to(dtype)
        clipped, was_clipped = clip_update(delta, max_norm)
        norm = torch.linalg.vector_norm(delta.double()).item()
        assert clipped.dtype == dtype and clipped.shape == delta.shape
        assert was_clipped == (norm > max_norm)
        assert torch.linalg.vector_norm(clipped.double()).item() <= max_norm
        if was_clipped:  # scaled, not truncated: the direction is kept, the norm ≈ C
            new_norm = torch.linalg.vector_norm(clipped.double()).item()
            assert new_norm == pytest.approx(max_norm, rel=2 * torch.finfo(dtype).eps + 1e-5)
            cosine = torch.nn.functional.cosine_similarity(clipped.double(), delta.double(), 0)
            assert cosine.item() == pytest.approx(1.0, abs=1e-3)


def test_clipping_rounds_toward_zero_in_low_precision():
    # clipped coordinates in float16's subnormal range, where a cast to nearest could
    # raise the norm well above C: rounded toward zero, it never does
    g = torch.Generator().manual_seed(2)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for max_norm in (1e-5, 3e-6, 1e-3):
            delta = torch.randn(5000, generator=g).to(dtype)
            clipped, was_clipped = clip_update(delta, max_norm)
            assert was_clipped
            assert torch.linalg.vector_norm(clipped.double()).item() <= max_norm
            assert (clipped.double().abs() <= delta.double().abs()).all()


def test_updates_within_c_are_unchanged():
    delta = torch.tensor([0.375, -0.5, 0.0])  # norm 0.625 exactly
    for max_norm in (0.625, 0.7, 1e9):
        clipped, was_clipped = clip_update(delta, max_norm)
        assert not was_clipped and torch.equal(clipped, delta)
        assert clipped.data_ptr() != delta.data_ptr()  # a copy, never the caller's tensor
    zero, was_clipped = clip_update(torch.zeros(4), 1.0)
    assert not was_clipped and zero.eq(0).all()


def test_batched_clipping_equals_clipping_each_row():
    g = torch.Generator().manual_seed(1)
    deltas = torch.randn(6, 50, generator=g) * torch.tensor([0.01, 0.1, 1, 10, 0, 0.05])[:, None]
    clipped, was_clipped = clip_updates(deltas, 1.0)
    assert was_clipped.dtype == torch.bool and was_clipped.tolist() == [
        False, False, True, True, False, False,
    ]  # fmt: skip
    for row, expected, flag in zip(deltas, clipped, was_clipped, strict=True):
        one, one_flag = clip_update(row, 1.0)
        assert torch.equal(one, expected) and one_flag == flag


def test_clipping_refuses_bad_input():
    for max_norm in (0.0, -1.0, math.nan, math.inf, True, "1"):
        with pytest.raises(ConfigError, match="max_norm"):
            clip_update(torch.ones(3), max_norm)
    with pytest.raises(ConfigError, match="finite"):
        clip_update(torch.tensor([1.0, math.nan]), 1.0)
    with pytest.raises(ConfigError, match="finite"):
        clip_updates(torch.tensor([[1.0, math.inf]]), 1.0)
    with pytest.raises(ConfigError, match="1-D"):
        clip_update(torch.ones(2, 3), 1.0)
    with pytest.raises(ConfigError, match="2-D"):
        clip_updates(torch.ones(3), 1.0)
    with pytest.raises(ConfigError, match="floating"):
        clip_update(torch.ones(3, dtype=torch.int64), 1.0)


# ---------------------------------------------------------------------------- noise
def _chi_square_interval(n: int, p: float = 1e-6) -> tuple[float, float]:
    """A two-sided (1 − p) interval of Σ x²/s² for n draws of N(0, s²)."""
    return stats.chi2.ppf(p / 2, n), stats.chi2.isf(p / 2, n)


@pytest.mark.parametrize("capacity", [1, 10, 100])
def test_noise_std_on_the_sum_is_sigma_c_whatever_the_normalizer(capacity):
    # flush_noise has no K: the std on the K-sum is σ·C for every buffer size K. Many
    # flushes of a small model; Σ x²/(σC)² must be χ² with that many degrees of freedom.
    sigma, max_norm, size, flushes = 1.3, 0.7, 500, 40
    g = torch.Generator().manual_seed(capacity)
    draws = torch.cat([flush_noise(size, sigma, max_norm, g) for _ in range(flushes)])
    assert draws.dtype == torch.float64 and draws.shape == (size * flushes,)
    n = draws.numel()
    low, high = _chi_square_interval(n)
    squares = draws.square().sum().item()
    assert low <= squares / (sigma * max_norm) ** 2 <= high
    # the test has the power to tell the std σC from σC/K (noise on the average) and from
    # σC·√K (noise per client), for every K > 1 tested here
    for wrong in (sigma * max_norm / 10, sigma * max_norm * math.sqrt(10)):
        assert not low <= squares / wrong**2 <= high
    assert abs(draws.mean().item()) < 5 * sigma * max_norm / math.sqrt(n)  # centred


def test_noise_sources():
    a = flush_noise(100, 1.0, 1.0, torch.Generator().manual_seed(5))
    b = flush_noise(100, 1.0, 1.0, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)  # a seed reproduces the noise
    secure = flush_noise(100, 1.0, 2.0, secure=True)
    assert secure.shape == (100,) and secure.std().item() > 0
    assert flush_noise(10, 0.0, 1.0, torch.Generator()).eq(0).all()  # σ = 0: no noise
    with pytest.raises(ConfigError, match="generator"):
        flush_noise(10, 1.0, 1.0, torch.Generator(), secure=True)
    for args, name in [
        ((0, 1.0, 1.0), "size"),
        ((10, -1.0, 1.0), "noise_multiplier"),
        ((10, math.nan, 1.0), "noise_multiplier"),
        ((10, 1.0, 0.0), "max_norm"),
    ]:
        with pytest.raises(ConfigError, match=name):
            flush_noise(*args)


# ----------------------------------------------------------------------- accounting
def _classic_rdp_epsilon(sigma: float, m: int, delta: float) -> float:
    """min over α > 1 of m·α/(2σ²) + log(1/δ)/(α − 1) (Mironov 2017, Prop. 3), minimized
    numerically: an upper bound on the composition's ε."""
    rho, log_inv_delta = m / (2 * sigma**2), math.log(1 / delta)
    result = optimize.minimize_scalar(
        lambda a: rho * a + log_inv_delta / (a - 1), bounds=(1 + 1e-9, 1e6), method="bounded",
        options={"xatol": 1e-10},
    )  # fmt: skip
    closed_form = rho + 2 * math.sqrt(rho * log_inv_delta)  # at α = 1 + √(log(1/δ)/ρ)
    assert result.fun == pytest.approx(closed_form, rel=1e-8)
    return result.fun


def _exact_gaussian_epsilon(sigma: float, m: int, delta: float) -> float:
    """The exact ε of m Gaussian mechanisms of noise multiplier σ: one Gaussian with
    μ = √m/σ, whose δ(ε) = Φ(−ε/μ + μ/2) − e^ε·Φ(−ε/μ − μ/2) (Balle & Wang 2018, Thm 8),
    solved for ε: a lower bound on any valid accounting."""
    mu = math.sqrt(m) / sigma

    def excess(eps: float) -> float:
        tail = math.exp(eps + stats.norm.logcdf(-eps / mu - mu / 2))
        return stats.norm.cdf(-eps / mu + mu / 2) - tail - delta

    return optimize.brentq(excess, 0.0, 1e4, xtol=1e-12)


# (σ, m, δ) where the best Rényi order lies inside dp-accounting's grid of orders; for
# tiny σ²/m (best order below 1.1, ε in the hundreds) its grid can lose to the classic
# bound's continuous minimum.
SETTINGS = [(1.0, 1, 1e-5), (0.8, 10, 1e-5), (2.0, 50, 1e-6), (5.0, 200, 1e-7), (50.0, 1, 1e-5)]


@pytest.mark.parametrize(("sigma", "m", "delta"), SETTINGS)
def test_epsilon_between_the_exact_gaussian_and_the_classic_rdp_bound(sigma, m, delta):
    epsilon = user_level_epsilon(sigma, m, delta)
    exact = _exact_gaussian_epsilon(sigma, m, delta)
    classic = _classic_rdp_epsilon(sigma, m, delta)
    assert exact <= epsilon <= classic
    assert epsilon <= 1.25 * exact  # RDP is somewhat loose, not grossly


def test_pld_accounting_is_tight():
    sigma, m, delta = 10.0, 3, 1e-5
    exact = _exact_gaussian_epsilon(sigma, m, delta)
    pld = user_level_epsilon(sigma, m, delta, accountant="pld")
    assert exact - 1e-9 <= pld <= exact + 1e-3  # an upper bound, up to discretization
    assert pld < user_level_epsilon(sigma, m, delta)


def test_more_participations_cost_more_and_more_noise_less():
    by_m = [user_level_epsilon(1.5, m, 1e-5) for m in (1, 2, 5, 20, 100)]
    assert by_m == sorted(by_m) and len(set(by_m)) == len(by_m)
    by_sigma = [user_level_epsilon(s, 10, 1e-5) for s in (0.7, 1.0, 2.0, 8.0)]
    assert by_sigma == sorted(by_sigma, reverse=True) and len(set(by_sigma)) == len(by_sigma)


def test_event_is_m_gaussians_under_the_one_user_relation():
    event = user_level_event(1.2, 7)
    assert event == dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(1.2), 7)
    assert event_from_dict(event_to_dict(event)) == event  # storable in the ledger
    assert RELATION is Neighbouring.ONE_USER
    direct = dp_accounting.rdp.RdpAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
    ).compose(dp_accounting.GaussianDpEvent(1.2), 7)
    assert user_level_epsilon(1.2, 7, 1e-6) == direct.get_epsilon(1e-6)
    one_by_one = Accountant(Neighbouring.ONE_USER, kind="rdp")
    for _ in range(7):
        one_by_one.compose(dp_accounting.GaussianDpEvent(1.2))
    assert one_by_one.epsilon(1e-6) == pytest.approx(user_level_epsilon(1.2, 7, 1e-6))


@pytest.mark.parametrize(
    ("args", "name"),
    [
        ((0.0, 5, 1e-5), "noise_multiplier"),
        ((-1.0, 5, 1e-5), "noise_multiplier"),
        ((math.nan, 5, 1e-5), "noise_multiplier"),
        ((1e-3, 5, 1e-5), "noise_multiplier"),  # below MIN_NOISE_MULTIPLIER
        ((1.0, 0, 1e-5), "participations_cap"),
        ((1.0, 2.0, 1e-5), "participations_cap"),
        ((1.0, True, 1e-5), "participations_cap"),
        ((1.0, 5, 0.0), "delta"),
        ((1.0, 5, 1.0), "delta"),
        ((1.0, 5, math.nan), "delta"),
    ],
)
def test_accounting_refuses_bad_parameters(args, name):
    with pytest.raises(ConfigError, match=name):
        user_level_epsilon(*args)
    if name != "delta":
        with pytest.raises(ConfigError, match=name):
            user_level_event(*args[:2])


def test_accounting_refuses_an_unknown_accountant():
    with pytest.raises(ConfigError, match="accountant"):
        user_level_epsilon(1.0, 5, 1e-5, accountant="moments")
