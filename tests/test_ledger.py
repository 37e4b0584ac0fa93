"""The privacy ledger's composition arithmetic."""

import math

import pytest

from labeldp.privacy import LedgerEntry, PrivacyLedger


def test_empty_ledger_is_non_private():
    ledger = PrivacyLedger()
    assert math.isinf(ledger.epsilon) and ledger.delta is None
    assert ledger.to_dict()["epsilon"] is None


def test_sequential_entries_add_and_parallel_groups_take_their_maximum():
    ledger = PrivacyLedger()
    ledger.record(LedgerEntry("a", 1.0, 1e-6))
    ledger.record(LedgerEntry("b", 0.5, 0.0, composition="parallel", group="stages"))
    ledger.record(LedgerEntry("c", 2.0, 1e-5, composition="parallel", group="stages"))
    ledger.record(LedgerEntry("d", 0.25, 0.0, composition="parallel", group="other"))
    assert ledger.epsilon == pytest.approx(1.0 + 2.0 + 0.25)
    assert ledger.delta == pytest.approx(1e-6 + 1e-5)


@pytest.mark.parametrize(
    "kwargs,fragment",
    [
        ({"epsilon": -1.0}, "epsilon must be finite and ≥ 0"),
        ({"epsilon": math.inf}, "epsilon must be finite"),
        ({"epsilon": 1.0, "delta": 1.0}, r"delta must be in \[0, 1\)"),
        ({"epsilon": 1.0, "composition": "magic"}, "composition must be one of"),
        ({"epsilon": 1.0, "composition": "parallel"}, "a parallel entry needs a group"),
    ],
)
def test_bad_entries_are_refused(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        LedgerEntry("m", **kwargs)
