"""Training methods, one module each, and the registry the CLI and sweeps read."""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from .base import Method, MethodResult, RunContext
from .none import NonPrivate

METHODS: dict[str, type] = {cls.name: cls for cls in (NonPrivate,)}


def build_method(name: str, options: dict[str, Any] | None = None) -> Method:
    """The method called ``name`` built with its hyper-parameters ``options``."""
    if name not in METHODS:
        raise ConfigError(f"method must be one of {', '.join(METHODS)}, got {name!r}")
    try:
        return METHODS[name](**(options or {}))
    except TypeError as exc:
        raise ConfigError(f"bad options for method {name!r}: {exc}") from exc


__all__ = ["METHODS", "Method", "MethodResult", "NonPrivate", "RunContext", "build_method"]
