"""The neighbouring relation a privacy guarantee is stated for.

An ε means nothing without the pair of datasets it compares. labeldp states three:

- REPLACE_ONE_LABEL ("replace one label"): the datasets differ in the label of one
  example, features and size the same. Label DP; the relation of RR, RRWithPrior, ALIBI
  and PATE-FM's label guarantee.
- ADD_REMOVE_ONE_EXAMPLE ("add or remove one example"): one dataset has one more example
  (features and label) than the other. DP-SGD's relation; it protects features too, and
  implies a replace-one-label guarantee only through group privacy of size 2
  (:func:`labeldp.privacy.dpsgd_accounting.replace_one_bound`).
- ONE_USER ("one user"): the datasets differ by everything one user contributed (added or
  removed). No method of labeldp states it yet; it exists so that a user-level entry is
  never summed with an example-level one.

Guarantees under different relations are different quantities; the ledger refuses to add
them (see :class:`labeldp.privacy.PrivacyLedger`). The values are the strings written in
metrics.json (the same ones attacks/harness.py has always used).
"""

from __future__ import annotations

import enum

import dp_accounting

from ..errors import ConfigError


class Neighbouring(str, enum.Enum):
    """A neighbouring relation; its value is the string stored in metrics.json."""

    REPLACE_ONE_LABEL = "replace one label"
    ADD_REMOVE_ONE_EXAMPLE = "add or remove one example"
    ONE_USER = "one user"

    def __str__(self) -> str:
        return self.value

    @property
    def dp_accounting_relation(self) -> dp_accounting.NeighboringRelation:
        """The relation dp-accounting's accountants read events under: REPLACE_ONE for a
        replaced label (one record's value changed to any other; what randomized response
        assumes), ADD_OR_REMOVE_ONE for an added or removed example, and for a user,
        whose records are added or removed together (the events' sensitivities are then
        per user)."""
        if self is Neighbouring.REPLACE_ONE_LABEL:
            return dp_accounting.NeighboringRelation.REPLACE_ONE
        return dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE


def parse_relation(value: Neighbouring | str) -> Neighbouring:
    """``value`` as a :class:`Neighbouring`; a ConfigError (a ValueError) listing the known
    values if it is none of them."""
    try:
        return Neighbouring(value)
    except ValueError:
        known = ", ".join(repr(r.value) for r in Neighbouring)
        raise ConfigError(f"unknown neighbouring relation {value!r}; known: {known}") from None
