"""An accountant: dp-accounting events composed one at a time, ε so far at any time.

:class:`Accountant` wraps dp-accounting's privacy-loss-distribution accountant ("pld",
the default: tight up to its discretization, always an upper bound) or its Rényi DP one
("rdp": a few per cent looser) for *one* neighbouring relation
(:class:`~labeldp.privacy.neighbouring.Neighbouring`). A run may compose each step's event
as it happens and ask :meth:`Accountant.epsilon` after every step; composing the same
events one at a time or all at once gives the same ε (up to the PLD's floating point).

Units: ε in nats (the usual ε of (ε, δ)-DP), δ a probability in [0, 1); the PLD's
``discretization`` is the grid step of the privacy loss, in nats.

How events are read. The accountant hands dp-accounting the relation's
``dp_accounting_relation``: REPLACE_ONE for "replace one label", ADD_OR_REMOVE_ONE
otherwise. dp-accounting's two accountants read an additive-noise event
(``GaussianDpEvent``, ``LaplaceDpEvent``) differently under REPLACE_ONE: the PLD one as a
value bounded by C replaced by another (the output's mean moves by up to 2C), the RDP one
as a move of C. An event stated for one reading would be under-counted by the other, so
under "replace one label" the RDP accountant refuses those events (RR events, read alike
by both, are fine).

A dp-accounting 0.6.0 bug worked around: its PLD accountant composes a
``RandomizedResponseDpEvent`` once whatever its count (``compose(event, 3)`` and
``SelfComposedDpEvent(event, 3)`` both give the ε of one), which would under-count a
repeated RR. The accountant composes such an event that many times, one at a time.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator

import dp_accounting
from dp_accounting import dp_event

from ..errors import ConfigError
from .neighbouring import Neighbouring, parse_relation

KINDS = ("pld", "rdp")
#: PLD discretization of the privacy loss (nats); 1e-4 keeps ε within ~1e-3 of exact.
PLD_DISCRETIZATION = 1e-4

_ADDITIVE_NOISE = (dp_event.GaussianDpEvent, dp_event.LaplaceDpEvent)


class Accountant:
    """Composes :class:`dp_accounting.DpEvent` s under one neighbouring relation.

    relation: the :class:`Neighbouring` relation every composed event is stated for.
    kind: "pld" (default) or "rdp". discretization: the PLD grid step in nats (> 0; "pld"
    only). ``events`` lists what was composed, as (event, count) pairs, in order.

    >>> from labeldp.privacy.events import randomized_response_event
    >>> acc = Accountant(Neighbouring.REPLACE_ONE_LABEL)
    >>> round(acc.compose(randomized_response_event(1.0, 10)).epsilon(0.0), 3)
    1.0
    """

    def __init__(
        self,
        relation: Neighbouring | str,
        kind: str = "pld",
        discretization: float = PLD_DISCRETIZATION,
    ) -> None:
        self.relation = parse_relation(relation)
        if kind not in KINDS:
            raise ConfigError(f"accountant must be one of {', '.join(KINDS)}, got {kind!r}")
        self.kind = kind
        dp_relation = self.relation.dp_accounting_relation
        if kind == "pld":
            if not (math.isfinite(discretization) and discretization > 0):
                raise ConfigError(
                    f"discretization must be a finite number > 0, got {discretization}"
                )
            self._accountant: dp_accounting.PrivacyAccountant = dp_accounting.pld.PLDAccountant(
                neighboring_relation=dp_relation, value_discretization_interval=discretization
            )
        else:
            self._accountant = dp_accounting.rdp.RdpAccountant(neighboring_relation=dp_relation)
        self.discretization = discretization if kind == "pld" else None
        self.events: list[tuple[dp_accounting.DpEvent, int]] = []

    def compose(self, event: dp_accounting.DpEvent, count: int = 1) -> Accountant:
        """Adds ``count`` ≥ 1 runs of ``event``; returns the accountant (for chaining).

        A ConfigError, composing nothing, for an event this accountant cannot account:
        ``UnsupportedDpEvent``, a combination dp-accounting does not support under the
        relation, or (RDP under "replace one label") an additive-noise event."""
        if not isinstance(event, dp_accounting.DpEvent):
            raise ConfigError(f"expected a dp_accounting DpEvent, got {type(event).__name__}")
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ConfigError(f"count must be an integer ≥ 1, got {count!r}")
        if self.kind == "rdp" and self.relation is Neighbouring.REPLACE_ONE_LABEL:
            noisy = [e for e in _leaves(event) if isinstance(e, _ADDITIVE_NOISE)]
            if noisy:
                raise ConfigError(
                    f"the RDP accountant reads {type(noisy[0]).__name__} under REPLACE_ONE "
                    "as a move of one sensitivity, the PLD one as two: ambiguous, refused; "
                    "account it with kind='pld'"
                )
        if not self._accountant.supports(event):
            raise ConfigError(
                f"the {self.kind} accountant cannot account {event!r} under '{self.relation.value}'"
            )
        with _quiet_absl():
            if self.kind == "pld" and any(
                isinstance(e, dp_event.RandomizedResponseDpEvent) for e in _leaves(event)
            ):
                for leaf, times in _flatten(event, count):
                    if isinstance(leaf, dp_event.RandomizedResponseDpEvent):
                        for _ in range(times):  # see the module's note on the count bug
                            self._accountant.compose(leaf)
                    else:
                        self._accountant.compose(leaf, times)
            else:
                self._accountant.compose(event, count)
        self.events.append((event, count))
        return self

    def epsilon(self, delta: float) -> float:
        """ε (nats) of everything composed so far at ``delta`` in [0, 1) (the RDP
        accountant needs δ > 0 for a finite ε); 0 before anything is composed, ``inf``
        after a non-private event."""
        if not 0 <= delta < 1:
            raise ConfigError(f"delta must be in [0, 1), got {delta}")
        with _quiet_absl():
            return float(self._accountant.get_epsilon(delta))

    def delta(self, epsilon: float) -> float:
        """δ of everything composed so far at ``epsilon`` ≥ 0 (nats): the smallest δ with
        an (ε, δ) guarantee, as the accountant computes it (an upper bound)."""
        if not (math.isfinite(epsilon) and epsilon >= 0):
            raise ConfigError(f"epsilon must be a finite number ≥ 0, got {epsilon}")
        with _quiet_absl():
            return float(self._accountant.get_delta(epsilon))


@contextlib.contextmanager
def _quiet_absl() -> Iterator[None]:
    """RDP logs a warning for each Rényi order whose series does not converge and is left
    out (which can only make ε larger, never smaller); keep that out of users' output."""
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        yield
    finally:
        absl.setLevel(level)


def _leaves(event: dp_accounting.DpEvent) -> Iterator[dp_accounting.DpEvent]:
    """``event`` and every event nested in it."""
    yield event
    for attribute in ("event", "events"):
        inner = getattr(event, attribute, None)
        for child in inner if isinstance(inner, (list, tuple)) else [inner]:
            if isinstance(child, dp_accounting.DpEvent):
                yield from _leaves(child)


def _flatten(
    event: dp_accounting.DpEvent, count: int
) -> Iterator[tuple[dp_accounting.DpEvent, int]]:
    """(event, count) pairs whose composition is ``count`` runs of ``event``: through
    ``SelfComposedDpEvent`` (counts multiply) and ``ComposedDpEvent`` (each part), as
    dp-accounting's accountants traverse them."""
    if isinstance(event, dp_event.SelfComposedDpEvent):
        yield from _flatten(event.event, event.count * count)
    elif isinstance(event, dp_event.ComposedDpEvent):
        for part in event.events:
            yield from _flatten(part, count)
    else:
        yield event, count
