"""Privacy ledger and accountants."""

from .dpsgd_accounting import calibrate_dpsgd_noise, dpsgd_epsilon
from .ledger import LedgerEntry, PrivacyLedger
from .pate_accounting import pate_epsilon

__all__ = [
    "LedgerEntry",
    "PrivacyLedger",
    "calibrate_dpsgd_noise",
    "dpsgd_epsilon",
    "pate_epsilon",
]
