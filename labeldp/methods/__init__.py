"""Training methods, one module each, and the registry the CLI and sweeps read."""

from __future__ import annotations

import inspect
from typing import Any

from ..errors import ConfigError
from .alibi import AlibiMethod
from .base import Method, MethodResult, RunContext
from .dpsgd import DPSGDMethod
from .lp_mst import LP2ST, LPMST
from .none import NonPrivate
from .pate_fm import PateFM
from .rr import RandomizedResponseMethod

METHODS: dict[str, type[Method]] = {
    cls.name: cls
    for cls in (
        NonPrivate,
        RandomizedResponseMethod,
        LP2ST,
        LPMST,
        AlibiMethod,
        DPSGDMethod,
        PateFM,
    )
}


def method_parameters(name: str) -> list[str]:
    """The hyper-parameters the method called ``name`` accepts (its constructor's)."""
    if name not in METHODS:
        raise ConfigError(f"method must be one of {', '.join(METHODS)}, got {name!r}")
    parameters = inspect.signature(METHODS[name].__init__).parameters.values()
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in parameters if p.name != "self" and p.kind in named]


def required_parameters(name: str) -> list[str]:
    """The hyper-parameters of method ``name`` that have no default (read from its
    constructor's signature)."""
    parameters = inspect.signature(METHODS[name].__init__).parameters
    return [p for p in method_parameters(name) if parameters[p].default is inspect.Parameter.empty]


def build_method(name: str, options: dict[str, Any] | None = None) -> Method:
    """The method called ``name`` built with its hyper-parameters ``options``."""
    if name not in METHODS:
        raise ConfigError(f"method must be one of {', '.join(METHODS)}, got {name!r}")
    options = options or {}
    unknown = sorted(set(options) - set(method_parameters(name)))
    if unknown:
        raise ConfigError(
            f"method {name} does not take {', '.join(unknown)}; it takes "
            f"{', '.join(method_parameters(name)) or 'no options'}"
        )
    missing = [p for p in required_parameters(name) if p not in options]
    if missing:
        raise ConfigError(f"method {name} needs options: {', '.join(missing)}")
    return METHODS[name](**options)


__all__ = [
    "LP2ST",
    "LPMST",
    "METHODS",
    "AlibiMethod",
    "DPSGDMethod",
    "Method",
    "MethodResult",
    "NonPrivate",
    "PateFM",
    "RandomizedResponseMethod",
    "RunContext",
    "build_method",
    "method_parameters",
    "required_parameters",
]
