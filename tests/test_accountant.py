"""The incremental accountant against dp-accounting called directly, and the DP-SGD
functions that wrap it."""

import dp_accounting
import pytest

from labeldp.errors import ConfigError
from labeldp.privacy import Accountant, Neighbouring, dpsgd_epsilon
from labeldp.privacy.dpsgd_accounting import dpsgd_event
from labeldp.privacy.events import randomized_response_event

EXAMPLE = Neighbouring.ADD_REMOVE_ONE_EXAMPLE
LABEL = Neighbouring.REPLACE_ONE_LABEL


def test_composing_step_by_step_equals_composing_at_once_and_dp_accounting_directly():
    sigma, q, steps, delta = 1.1, 0.05, 5, 1e-5
    step = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
    for kind, grid, count in (("pld", 1e-3, steps), ("rdp", None, 20)):
        options = {"discretization": grid} if grid else {}
        incremental = Accountant(EXAMPLE, kind, **options)
        so_far = []
        for _ in range(count):
            so_far.append(incremental.compose(step).epsilon(delta))
        assert so_far == sorted(so_far) and so_far[0] < so_far[-1]  # ε so far only grows
        batch = Accountant(EXAMPLE, kind, **options).compose(dpsgd_event(sigma, q, count))
        if kind == "pld":
            direct = dp_accounting.pld.PLDAccountant(
                dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE, grid
            )
        else:
            direct = dp_accounting.rdp.RdpAccountant()
        direct = direct.compose(dp_accounting.SelfComposedDpEvent(step, count))
        assert batch.epsilon(delta) == direct.get_epsilon(delta)
        assert so_far[-1] == pytest.approx(batch.epsilon(delta), rel=1e-6)
        assert len(incremental.events) == count and batch.events == [
            (dpsgd_event(sigma, q, count), 1)
        ]


@pytest.mark.parametrize("kind", ["pld", "rdp"])
def test_counts_compose_like_repeated_events(kind):
    # dp-accounting 0.6.0's PLD accountant ignores the count of an RR event (it gives
    # the ε of one RR for three); the accountant must not.
    rr = randomized_response_event(1.0, 10)
    gaussian = dp_accounting.GaussianDpEvent(3.0)
    events = [rr] if kind == "rdp" else [rr, gaussian]  # RDP: no Gaussian under REPLACE_ONE
    options = {"discretization": 1e-3} if kind == "pld" else {}

    def accountant():
        return Accountant(LABEL, kind, **options)

    for event in events:
        expected = accountant().compose(event).compose(event).compose(event).epsilon(1e-6)
        for composed in (
            accountant().compose(event, count=3),
            accountant().compose(dp_accounting.SelfComposedDpEvent(event, 3)),
            accountant().compose(dp_accounting.ComposedDpEvent([event] * 3)),
            accountant().compose(
                dp_accounting.ComposedDpEvent([dp_accounting.SelfComposedDpEvent(event, 2), event])
            ),
        ):
            assert composed.epsilon(1e-6) == pytest.approx(expected, rel=1e-6)
    # three RR at ε = 1: clearly more than one (ε = 1), about basic composition's 3 at most
    # (the PLD's grid rounds up by ≤ 3 steps; RDP's conversion is a little looser)
    assert 1.5 < accountant().compose(rr, count=3).epsilon(1e-6) <= 3.0 * 1.001


def test_dpsgd_epsilon_is_the_accountant_of_its_event():
    cases = [((1.1, 0.01, 300), "pld"), ((1.1, 0.01, 300), "rdp"), ((2.0, 1.0, 10), "rdp")]
    for args, kind in cases:
        expected = Accountant(EXAMPLE, kind).compose(dpsgd_event(*args)).epsilon(1e-5)
        assert dpsgd_epsilon(*args, 1e-5, kind) == expected


def test_nothing_composed_costs_nothing_and_a_non_private_event_everything():
    accountant = Accountant(LABEL)
    assert accountant.epsilon(0.0) == 0.0 and accountant.events == []
    assert accountant.compose(dp_accounting.NonPrivateDpEvent()).epsilon(1e-5) == float("inf")


@pytest.mark.parametrize(
    "make, fragment",
    [
        (lambda: Accountant(LABEL, "moments"), "accountant must be one of pld, rdp"),
        (lambda: Accountant("replace one pixel"), "unknown neighbouring relation"),
        (lambda: Accountant(LABEL, discretization=0.0), "discretization"),
        (lambda: Accountant(LABEL).compose(dp_accounting.UnsupportedDpEvent()), "cannot account"),
        # dp-accounting defines RR only for a replaced value, not an added one
        (lambda: Accountant(EXAMPLE).compose(randomized_response_event(1.0, 3)), "cannot account"),
        (lambda: Accountant(LABEL, "rdp").compose(dpsgd_event(1.0, 1.0, 3)), "ambiguous"),
        (lambda: Accountant(LABEL).compose(randomized_response_event(1.0, 3), 0), "count"),
        (lambda: Accountant(LABEL).compose({"class_name": "GaussianDpEvent"}), "DpEvent"),
        (lambda: Accountant(LABEL).epsilon(1.0), "delta must be in"),
    ],
)
def test_what_cannot_be_accounted_is_refused(make, fragment):
    with pytest.raises(ConfigError, match=fragment):
        make()


def test_a_refused_event_leaves_the_accountant_as_it_was():
    accountant = Accountant(LABEL).compose(randomized_response_event(1.0, 3))
    before = accountant.epsilon(0.0)
    with pytest.raises(ConfigError):
        accountant.compose(dp_accounting.UnsupportedDpEvent())
    assert accountant.epsilon(0.0) == before and len(accountant.events) == 1
