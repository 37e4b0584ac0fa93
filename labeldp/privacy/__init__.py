"""Privacy ledger and accountants."""

from .ledger import LedgerEntry, PrivacyLedger

__all__ = ["LedgerEntry", "PrivacyLedger"]
