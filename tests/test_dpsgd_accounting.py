"""DP-SGD accounting against independent computations: dp-accounting used directly, the
analytic Gaussian mechanism (no sampling), Opacus's RDP accountant, and calibration."""

from __future__ import annotations

import math

import dp_accounting
import pytest
from scipy.stats import norm

from labeldp import cli
from labeldp.errors import ConfigError
from labeldp.privacy import calibrate_dpsgd_noise, dpsgd_epsilon
from labeldp.privacy.dpsgd_accounting import replace_one_bound

opacus_accountants = pytest.importorskip("opacus.accountants")

GRID = [(0.8, 0.01, 300), (1.1, 256 / 60000, 2000), (2.0, 0.05, 50)]


@pytest.mark.parametrize("sigma, q, steps", GRID)
def test_epsilon_equals_dp_accounting_for_the_same_events(sigma, q, steps):
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
    )
    pld = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
    rdp = dp_accounting.rdp.RdpAccountant()
    assert dpsgd_epsilon(sigma, q, steps, 1e-5) == pytest.approx(
        pld.compose(event).get_epsilon(1e-5), rel=1e-12
    )
    assert dpsgd_epsilon(sigma, q, steps, 1e-5, "rdp") == pytest.approx(
        rdp.compose(event).get_epsilon(1e-5), rel=1e-12
    )


@pytest.mark.parametrize("sigma, q, steps", GRID)
def test_epsilon_is_at_most_opacus_rdp(sigma, q, steps):
    accountant = opacus_accountants.RDPAccountant()
    accountant.history = [(sigma, q, steps)]
    opacus_eps = accountant.get_epsilon(1e-5)
    pld = dpsgd_epsilon(sigma, q, steps, 1e-5)
    rdp = dpsgd_epsilon(sigma, q, steps, 1e-5, "rdp")
    assert pld < 0.97 * opacus_eps  # the default (PLD) is markedly tighter
    # The same RDP analysis; the two libraries' grids of Rényi orders differ slightly.
    assert rdp == pytest.approx(opacus_eps, rel=1e-4)


def _analytic_gaussian_delta(epsilon: float, mu: float) -> float:
    """δ(ε) of the Gaussian mechanism with sensitivity/σ = mu (Balle & Wang 2018)."""
    return norm.cdf(-epsilon / mu + mu / 2) - math.exp(epsilon) * norm.cdf(-epsilon / mu - mu / 2)


@pytest.mark.parametrize("sigma, steps", [(2.0, 4), (5.0, 30), (1.0, 1)])
def test_without_sampling_epsilon_is_the_exact_gaussian_one(sigma, steps):
    # T Gaussian mechanisms with noise multiplier σ compose to one with σ / sqrt(T).
    mu = math.sqrt(steps) / sigma
    eps = dpsgd_epsilon(sigma, 1.0, steps, 1e-5)
    assert _analytic_gaussian_delta(eps, mu) == pytest.approx(1e-5, rel=0.02)
    assert _analytic_gaussian_delta(0.99 * eps, mu) > 1e-5  # not loose by 1 %


def test_epsilon_decreases_with_noise_and_grows_with_steps_and_rate():
    base = dpsgd_epsilon(1.0, 0.01, 500, 1e-5)
    assert dpsgd_epsilon(1.2, 0.01, 500, 1e-5) < base
    assert dpsgd_epsilon(1.0, 0.01, 1000, 1e-5) > base
    assert dpsgd_epsilon(1.0, 0.02, 500, 1e-5) > base


@pytest.mark.parametrize(
    "accountant, target", [("pld", 0.5), ("pld", 3.0), ("rdp", 0.5), ("rdp", 3.0), ("rdp", 8.0)]
)
def test_calibration_hits_the_target_within_one_percent_from_below(accountant, target):
    q, steps = 0.02, 400
    sigma = calibrate_dpsgd_noise(target, 1e-5, q, steps, accountant)
    eps = dpsgd_epsilon(sigma, q, steps, 1e-5, accountant)
    assert 0.99 * target <= eps <= target


def test_bad_arguments_name_the_parameter_and_range():
    cases = [
        (lambda: dpsgd_epsilon(0, 0.1, 10, 1e-5), "noise_multiplier"),
        (lambda: dpsgd_epsilon(1, 0, 10, 1e-5), "sample_rate must be in (0, 1]"),
        (lambda: dpsgd_epsilon(1, 0.1, 0, 1e-5), "steps must be an integer ≥ 1"),
        (lambda: dpsgd_epsilon(1, 0.1, 10, 1.5), "delta must be in (0, 1)"),
        (lambda: dpsgd_epsilon(1, 0.1, 10, 1e-5, "moments"), "accountant must be one of"),
        (lambda: calibrate_dpsgd_noise(-1, 1e-5, 0.1, 10), "target_epsilon"),
    ]
    for call, fragment in cases:
        with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
            call()


def test_replace_one_bound_is_group_privacy_of_two():
    assert replace_one_bound(1.0, 1e-5) == (2.0, pytest.approx((1 + math.e) * 1e-5))


def test_cli_account_prints_epsilon_and_calibrates(capsys):
    assert (
        cli.main(
            [
                "account",
                "dp-sgd",
                "--noise-multiplier",
                "1.1",
                "--sample-rate",
                "0.01",
                "--steps",
                "300",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert f"ε = {dpsgd_epsilon(1.1, 0.01, 300, 1e-5):.6g}" in out
    assert (
        cli.main(
            [
                "account",
                "dp-sgd",
                "--epsilon",
                "2",
                "--examples",
                "1000",
                "--batch-size",
                "20",
                "--epochs",
                "3",
                "--accountant",
                "rdp",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    sigma = calibrate_dpsgd_noise(2, 1e-5, 0.02, 150, "rdp")
    assert f"noise multiplier {sigma:.6g}" in out and "steps 150" in out
    assert cli.main(["account", "dp-sgd", "--epsilon", "2", "--steps", "5"]) == 2
    assert "--sample-rate" in capsys.readouterr().err
