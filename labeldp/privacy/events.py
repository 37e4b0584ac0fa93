"""dp-accounting events in metrics.json: their named-tuple form as JSON, and back.

A ``DpEvent`` (dp-accounting's description of a mechanism, enough to account for it alone
or composed) is written as the dict of its named-tuple form (``DpEvent.to_named_tuple``):
``module_name`` and ``class_name`` beside its fields, nested events as such dicts too, e.g.

    {"module_name": "dp_accounting.dp_event", "class_name": "RandomizedResponseDpEvent",
     "noise_parameter": 0.48, "num_buckets": 10}

:func:`event_from_dict` rebuilds the event through ``DpEvent.from_named_tuple``, and only
for classes of ``dp_accounting.dp_event`` (a stored file never names a module to import).

Also here: the events of randomized response and of a pure ε-DP mechanism, which the
label mechanisms share.
"""

from __future__ import annotations

import math
from collections import namedtuple
from typing import Any

import dp_accounting
from dp_accounting import dp_event

from ..errors import ConfigError

EVENT_MODULE = dp_event.__name__


def event_to_dict(event: dp_accounting.DpEvent) -> dict[str, Any]:
    """The JSON-able dict of ``event``'s named-tuple form (recursively)."""
    if not isinstance(event, dp_accounting.DpEvent):
        raise ConfigError(f"expected a dp_accounting DpEvent, got {type(event).__name__}")
    return _plain(event.to_named_tuple())


def _plain(value: Any) -> Any:
    if isinstance(value, dp_event.DpEventNamedTuple):
        return {name: _plain(getattr(value, name)) for name in value._fields}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def event_from_dict(data: dict[str, Any]) -> dp_accounting.DpEvent:
    """The event :func:`event_to_dict` wrote. ValueError for a dict that does not name a
    ``DpEvent`` class of ``dp_accounting.dp_event``."""
    return dp_accounting.DpEvent.from_named_tuple(_named_tuple(data))


def _named_tuple(value: Any) -> Any:
    if isinstance(value, dict):
        module, name = value.get("module_name"), value.get("class_name")
        cls = getattr(dp_event, name, None) if isinstance(name, str) else None
        if module != EVENT_MODULE or not (
            isinstance(cls, type) and issubclass(cls, dp_accounting.DpEvent)
        ):
            raise ConfigError(
                f"not a stored dp-accounting event (module {module!r}, class {name!r}); "
                f"only classes of {EVENT_MODULE} are read back"
            )
        fields = {k: _named_tuple(v) for k, v in value.items()}
        return namedtuple(f"_{name}", list(fields))(**fields)
    if isinstance(value, list):
        return [_named_tuple(v) for v in value]
    return value


def randomized_response_event(epsilon: float, buckets: int) -> dp_accounting.DpEvent:
    """The event of k-ary randomized response at ε over ``buckets`` = k ≥ 2 values: keep
    the value with probability e^ε/(e^ε + k − 1), else another one uniformly.

    dp-accounting's noise parameter p is the probability of answering a uniformly random
    bucket (the true one included), so keep = 1 − p + p/k and each other bucket gets p/k.
    Matching p/k = 1/(e^ε + k − 1) gives p = k/(e^ε + k − 1), computed as
    k·e^{−ε}/(1 + (k − 1)·e^{−ε}) (no overflow for large ε). Under dp-accounting's
    REPLACE_ONE relation (one value replaced by any other) its ε at δ = 0 is ε."""
    k = int(buckets)
    p = k * math.exp(-epsilon) / (1.0 + (k - 1) * math.exp(-epsilon))
    return dp_accounting.RandomizedResponseDpEvent(noise_parameter=min(p, 1.0), num_buckets=k)


def pure_dp_event(epsilon: float) -> dp_accounting.DpEvent:
    """An event that dominates *every* pure ε-DP mechanism: binary randomized response at
    ε. Kairouz, Oh & Viswanath (2015, "The composition theorem for differential
    privacy"): for any ε-DP mechanism and neighbouring pair, the pair of its output
    distributions is a post-processing of binary RR's, so binary RR's privacy loss
    bounds theirs, alone and under any composition. Exact for binary RR; for another ε-DP
    mechanism a sound description whose ε at δ = 0 is its ε, possibly looser at δ > 0 or
    once composed."""
    return randomized_response_event(epsilon, 2)
