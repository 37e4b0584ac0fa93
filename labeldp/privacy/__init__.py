"""Privacy ledger and accountants."""

from .accountant import Accountant
from .dpsgd_accounting import calibrate_dpsgd_noise, dpsgd_epsilon
from .events import event_from_dict, event_to_dict
from .ledger import LedgerEntry, PrivacyLedger
from .neighbouring import Neighbouring
from .pate_accounting import pate_epsilon

__all__ = [
    "Accountant",
    "LedgerEntry",
    "Neighbouring",
    "PrivacyLedger",
    "calibrate_dpsgd_noise",
    "dpsgd_epsilon",
    "event_from_dict",
    "event_to_dict",
    "pate_epsilon",
]
