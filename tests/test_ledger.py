"""The privacy ledger: composition arithmetic, one neighbouring relation per ledger, and
each entry's dp-accounting event, checked against independent computations (the
mechanism's exact output probabilities, closed forms, dp-accounting as an oracle)."""

import json
import math

import dp_accounting
import pytest
import torch
from scipy.stats import norm

from attacks.harness import relation as harness_relation
from labeldp.mechanisms import Alibi, RandomizedResponse, RRWithPrior
from labeldp.privacy import (
    Accountant,
    LedgerEntry,
    Neighbouring,
    PrivacyLedger,
    event_from_dict,
    event_to_dict,
)
from labeldp.privacy.dpsgd_accounting import dpsgd_event

LABEL = Neighbouring.REPLACE_ONE_LABEL
EXAMPLE = Neighbouring.ADD_REMOVE_ONE_EXAMPLE
NOOP = dp_accounting.NoOpDpEvent()


def entry(mechanism, epsilon, delta=0.0, relation=LABEL, **kwargs):
    return LedgerEntry(mechanism, epsilon, delta, relation=relation, event=NOOP, **kwargs)


def test_empty_ledger_is_non_private():
    ledger = PrivacyLedger()
    assert math.isinf(ledger.epsilon) and ledger.delta is None
    assert ledger.to_dict()["epsilon"] == "Infinity" and ledger.to_dict()["relation"] is None


def test_sequential_entries_add_and_parallel_groups_take_their_maximum():
    ledger = PrivacyLedger()
    ledger.record(entry("a", 1.0, 1e-6))
    ledger.record(entry("b", 0.5, 0.0, composition="parallel", group="stages"))
    ledger.record(entry("c", 2.0, 1e-5, composition="parallel", group="stages"))
    ledger.record(entry("d", 0.25, 0.0, composition="parallel", group="other"))
    assert ledger.epsilon == pytest.approx(1.0 + 2.0 + 0.25)
    assert ledger.delta == pytest.approx(1e-6 + 1e-5)
    assert ledger.to_dict()["relation"] == "replace one label"


@pytest.mark.parametrize(
    "kwargs,fragment",
    [
        ({"epsilon": -1.0}, "epsilon must be finite and ≥ 0"),
        ({"epsilon": math.inf}, "epsilon must be finite"),
        ({"epsilon": 1.0, "delta": 1.0}, r"delta must be in \[0, 1\)"),
        ({"epsilon": 1.0, "composition": "magic"}, "composition must be one of"),
        ({"epsilon": 1.0, "composition": "parallel"}, "a parallel entry needs a group"),
        ({"epsilon": 1.0, "relation": "replace one pixel"}, "unknown neighbouring relation"),
    ],
)
def test_bad_entries_are_refused(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        entry("m", **kwargs)


def test_an_entry_states_its_relation_and_its_event():
    with pytest.raises(TypeError, match="relation"):
        LedgerEntry("m", 1.0, event=NOOP)
    with pytest.raises(TypeError, match="event"):
        LedgerEntry("m", 1.0, relation=LABEL)
    with pytest.raises(ValueError, match="event must be a dp_accounting DpEvent"):
        LedgerEntry("m", 1.0, relation=LABEL, event={"class_name": "GaussianDpEvent"})
    with pytest.raises(ValueError, match="must say why in event_note"):
        LedgerEntry("m", 1.0, relation=LABEL, event=dp_accounting.UnsupportedDpEvent())
    # the relation's JSON string is accepted and becomes the enum
    assert entry("m", 1.0, relation="add or remove one example").relation is EXAMPLE


def test_the_ledger_refuses_to_add_entries_of_different_relations():
    ledger = PrivacyLedger()
    ledger.record(entry("randomized-response", 1.0))
    with pytest.raises(ValueError, match="'add or remove one example'.*'replace one label'"):
        ledger.record(entry("dp-sgd", 0.5, 1e-5, relation=EXAMPLE))
    assert len(ledger.entries) == 1 and ledger.epsilon == 1.0  # nothing was added
    other = PrivacyLedger()
    other.record(entry("dp-sgd", 0.5, 1e-5, relation=EXAMPLE))
    with pytest.raises(ValueError, match="one user"):
        other.record(entry("user-level", 0.5, relation=Neighbouring.ONE_USER))
    conditioned = other.with_condition("the seed stays secret")
    assert conditioned.relation is EXAMPLE and conditioned.to_dict()["relation"] == EXAMPLE.value


EVENTS = [
    dp_accounting.RandomizedResponseDpEvent(0.3, 10),
    dp_accounting.GaussianDpEvent(1.5),
    dp_accounting.LaplaceDpEvent(0.5),
    dpsgd_event(1.1, 0.01, 300),
    dpsgd_event(2.0, 1.0, 4),
    dp_accounting.ComposedDpEvent(
        [
            dp_accounting.GaussianDpEvent(1.0),
            dp_accounting.SelfComposedDpEvent(dp_accounting.LaplaceDpEvent(2.0), 3),
        ]
    ),
    dp_accounting.UnsupportedDpEvent(),
    dp_accounting.NonPrivateDpEvent(),
]


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: type(e).__name__)
def test_events_round_trip_through_json_in_their_named_tuple_form(event):
    data = json.loads(json.dumps(event_to_dict(event)))
    assert data["class_name"] == type(event).__name__
    assert data["module_name"] == "dp_accounting.dp_event"
    assert event_from_dict(data) == event


def test_the_stored_form_is_dp_accountings_named_tuple_and_foreign_classes_are_refused():
    event = dpsgd_event(1.1, 0.01, 300)
    data = event_to_dict(event)
    assert data["count"] == 300 and data["event"]["sampling_probability"] == 0.01
    assert data["event"]["event"] == {
        "module_name": "dp_accounting.dp_event",
        "class_name": "GaussianDpEvent",
        "noise_multiplier": 1.1,
    }
    for bad in (
        {**data, "module_name": "os"},
        {**data, "class_name": "DpEventNamedTuple"},
        {**data, "event": {**data["event"], "class_name": "system"}},
    ):
        with pytest.raises(ValueError, match="not a stored dp-accounting event"):
            event_from_dict(bad)


def test_to_dict_writes_each_entrys_relation_and_event():
    ledger = PrivacyLedger()
    ledger.record(RandomizedResponse(2.0, 10).ledger_entry(examples=5))
    data = json.loads(json.dumps(ledger.to_dict()))
    (stored,) = data["entries"]
    assert data["relation"] == stored["relation"] == "replace one label"
    assert event_from_dict(stored["event"]) == RandomizedResponse(2.0, 10).dp_event()
    assert stored["event_note"].startswith("exact")
    assert (data["epsilon"], data["delta"]) == (2.0, 0.0)


def _accounted(entry: LedgerEntry) -> float:
    """ε of the entry's event, stored and read back, through dp-accounting's PLD."""
    event = event_from_dict(json.loads(json.dumps(event_to_dict(entry.event))))
    return Accountant(entry.relation).compose(event).epsilon(entry.delta)


@pytest.mark.parametrize("epsilon, classes", [(0.5, 10), (2.0, 10), (4.0, 2), (8.0, 100)])
def test_rr_event_is_the_mechanism_and_gives_its_epsilon(epsilon, classes):
    rr = RandomizedResponse(epsilon, classes)
    event = rr.dp_event()
    # closed form: dp-accounting's RR keeps the bucket w.p. 1 − p + p/k, each other p/k
    p, k = event.noise_parameter, event.num_buckets
    probs = rr.output_probabilities(torch.arange(classes))
    assert k == classes
    assert torch.allclose(probs.diagonal(), torch.full((k,), 1 - p + p / k, dtype=torch.float64))
    assert probs[0, 1].item() == pytest.approx(p / k, rel=1e-12)
    # dp-accounting's PLD: ε at δ = 0 is the mechanism's, up to the grid (rounded up)
    accounted = _accounted(rr.ledger_entry(examples=1))
    assert epsilon - 1e-9 <= accounted <= epsilon + 2e-4


def _hockey_stick(p: torch.Tensor, q: torch.Tensor, epsilon: float) -> float:
    """δ(ε) = Σ max(0, p − e^ε q) of two discrete output distributions."""
    return float((p - math.exp(epsilon) * q).clamp(min=0).sum())


@pytest.mark.parametrize("epsilon", [0.5, 2.0])
def test_rr_with_prior_event_dominates_the_mechanism_and_gives_its_epsilon(epsilon):
    mech = RRWithPrior(epsilon)
    entry_ = mech.ledger_entry(3, composition="parallel", group="lp")
    assert epsilon - 1e-9 <= _accounted(entry_) <= epsilon + 2e-4
    # Brute force: every pair of labels, priors giving k* = 1 … K, against the event's δ(ε′).
    accountant = Accountant(LABEL).compose(mech.dp_event())
    classes = 5
    priors = torch.softmax(
        torch.randn(40, classes, generator=torch.Generator().manual_seed(0))
        * torch.linspace(0.1, 6, 40)[:, None],
        dim=1,
    )
    assert set(mech.optimal_k(priors).tolist()) >= {1, classes}
    worst = {e: 0.0 for e in (0.0, epsilon / 4, epsilon / 2, 0.9 * epsilon)}
    for prior in priors:
        rows = mech.output_probabilities(torch.arange(classes), prior.expand(classes, -1))
        for a in range(classes):
            for b in range(classes):
                for e in worst:
                    worst[e] = max(worst[e], _hockey_stick(rows[a], rows[b], e))
    for e, delta in worst.items():
        assert delta <= accountant.delta(e) + 1e-9
    assert worst[0.0] > 0.5 * accountant.delta(0.0)  # and not vacuous


def test_alibi_gaussian_event_is_the_gaussian_mechanism_of_sensitivity_root_two():
    for epsilon, delta in [(1.0, 1e-5), (4.0, 1e-6)]:
        mech = Alibi(epsilon, 10, noise="gaussian", delta=delta)
        assert _accounted(mech.ledger_entry(examples=7)) == pytest.approx(epsilon, rel=1e-3)
        # closed form (Balle & Wang 2018): the δ(ε) of shift √2 at standard deviation s
        mu = math.sqrt(2) / mech.scale
        exact = norm.cdf(-epsilon / mu + mu / 2) - math.exp(epsilon) * norm.cdf(
            -epsilon / mu - mu / 2
        )
        assert exact == pytest.approx(delta, rel=1e-6)
    with pytest.raises(ValueError, match="RDP accountant reads GaussianDpEvent"):
        Accountant(LABEL, "rdp").compose(mech.dp_event())


def test_alibi_laplace_event_dominates_the_two_coordinate_laplace_mechanism():
    epsilon = 1.0
    mech = Alibi(epsilon, 10)
    assert epsilon - 1e-9 <= _accounted(mech.ledger_entry(examples=7)) <= epsilon + 2e-4
    # The exact mechanism: the two coordinates that change, each a Laplace mechanism of
    # sensitivity 1 and scale b = 2/ε (independent noise: their losses compose).
    exact = dp_accounting.pld.privacy_loss_distribution.from_laplace_mechanism(
        mech.scale, value_discretization_interval=1e-4
    ).self_compose(2)
    event = Accountant(LABEL).compose(mech.dp_event())
    for e in (0.0, 0.25, 0.5, 0.9):
        assert exact.get_delta_for_epsilon(e) <= event.delta(e) + 1e-6


def test_old_and_new_ledgers_name_the_same_relation():
    # metrics.json stored before entries had a relation (hundreds of rows in runs.sqlite)
    old_dpsgd = {
        "ledger": {
            "epsilon": 1.0,
            "delta": 1e-5,
            "entries": [
                {"mechanism": "dp-sgd", "details": {"neighboring_relation": EXAMPLE.value}}
            ],
        }
    }
    old_rr = {
        "ledger": {
            "epsilon": 1.0,
            "delta": 0.0,
            "entries": [{"mechanism": "randomized-response", "details": {}}],
        }
    }
    assert harness_relation("dp-sgd", old_dpsgd) == EXAMPLE.value
    assert harness_relation("dp-sgd", {}) == EXAMPLE.value
    assert harness_relation("rr", old_rr) == LABEL.value
    ledger = PrivacyLedger()
    ledger.record(entry("new-method", 1.0, relation=EXAMPLE))
    assert harness_relation("new-method", {"ledger": ledger.to_dict()}) == EXAMPLE.value
    assert harness_relation("none", {"ledger": PrivacyLedger().to_dict()}) is None
