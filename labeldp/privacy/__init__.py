"""Privacy ledger and accountants."""

from .dpsgd_accounting import calibrate_dpsgd_noise, dpsgd_epsilon
from .ledger import LedgerEntry, PrivacyLedger

__all__ = ["LedgerEntry", "PrivacyLedger", "calibrate_dpsgd_noise", "dpsgd_epsilon"]
