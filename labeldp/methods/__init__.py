"""Training methods, one module each, and the registry the CLI and sweeps read."""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from ..options import OptionSpec, specs
from .alibi import AlibiMethod
from .base import Method, MethodResult, RunContext
from .dpsgd import DPSGDMethod
from .labeldp_pro import LabelDPPro
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
        LabelDPPro,
        PateFM,
    )
}


def method_class(name: str) -> type[Method]:
    """The method class called ``name``; ConfigError naming the methods otherwise."""
    if name not in METHODS:
        raise ConfigError(f"method must be one of {', '.join(METHODS)}, got {name!r}")
    return METHODS[name]


def method_options(name: str) -> list[OptionSpec]:
    """The declared options of method ``name`` (:mod:`labeldp.options`), in order."""
    return specs(method_class(name).Options)


def method_parameters(name: str) -> list[str]:
    """The hyper-parameters the method called ``name`` accepts (its declared options)."""
    return [spec.name for spec in method_options(name)]


def build_method(name: str, options: dict[str, Any] | None = None) -> Method:
    """The method called ``name`` built with its hyper-parameters ``options`` (checked
    against its declared options: unknown, missing and out-of-range ones are a
    ConfigError naming them)."""
    return method_class(name)(**(options or {}))


__all__ = [
    "LP2ST",
    "LPMST",
    "METHODS",
    "AlibiMethod",
    "DPSGDMethod",
    "LabelDPPro",
    "Method",
    "MethodResult",
    "NonPrivate",
    "PateFM",
    "RandomizedResponseMethod",
    "RunContext",
    "build_method",
    "method_class",
    "method_options",
    "method_parameters",
]
