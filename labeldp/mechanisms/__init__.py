"""Label mechanisms: pure objects that randomize labels and say what that costs.

Each has an ε (and δ), a ``privatize`` that randomizes every label once, and a
``ledger_entry`` for the run's privacy ledger. They know nothing of training.
"""

from .alibi import Alibi, gaussian_sigma
from .base import LabelMechanism
from .confident_gnmax import Aggregation, ConfidentGNMax
from .rr import RandomizedResponse
from .rr_prior import RRWithPrior

__all__ = [
    "Aggregation",
    "Alibi",
    "ConfidentGNMax",
    "LabelMechanism",
    "RRWithPrior",
    "RandomizedResponse",
    "gaussian_sigma",
]
