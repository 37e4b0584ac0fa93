"""Method options, each declared once.

A method's hyper-parameters are one frozen dataclass (a :class:`MethodOptions`) whose
fields are made by :func:`option`: the default (none: the option is required), the kind
of value and its allowed range (:class:`Number`, :class:`Choice`, :class:`Switch`,
:class:`Numbers`, :class:`Text`), the help text and the command-line flag. Everything
else is generated from that one declaration:

- the checks (``MethodOptions.__post_init__``: each field's kind, then the class's
  cross-field :meth:`MethodOptions.validate`), with messages that name the option and
  its allowed range;
- :meth:`Method.options` (what config.json records) and ``build_method``'s signature;
- the ``labeldp train`` flags, their help and their real defaults (:func:`flags`);
- sweep-file validation (an unknown key names the allowed ones; values are checked
  by the same kinds) and the options table of the docs (:func:`options_markdown`,
  ``docs/METHOD_OPTIONS.md``, kept equal by a test).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Iterable, Sequence
from dataclasses import MISSING, dataclass
from typing import Any

import numpy as np

from .errors import ConfigError


class Kind:
    """What values an option takes. ``describe``: the allowed values, for messages
    ("a finite number > 0"); ``check(value)`` returns the value normalized (e.g. an int
    given for a float option becomes a float) or raises ValueError; ``parse(text)`` reads
    a command-line string."""

    describe: str = "a value"

    @property
    def cli_describe(self) -> str:
        """The allowed values as typed on the command line (default: :attr:`describe`)."""
        return self.describe

    def check(self, value: Any) -> Any:
        return value

    def parse(self, text: str) -> Any:
        return self.check(text)

    def argparse_options(self) -> dict[str, Any]:
        """Keyword arguments of ``add_argument`` for this kind (type, choices, action)."""

        def parse(text: str) -> Any:
            try:
                return self.parse(text)
            except ValueError:
                raise argparse.ArgumentTypeError(
                    f"must be {self.cli_describe}, got {text!r}"
                ) from None

        return {"type": parse}


@dataclass(frozen=True)
class Number(Kind):
    """An int (``kind=int``) or a finite float in a range. low/high: bounds (None: none);
    low_open/high_open: exclude the bound."""

    kind: type = float
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    @property
    def describe(self) -> str:  # type: ignore[override]
        return self._describe("a finite number")

    @property
    def cli_describe(self) -> str:
        return self._describe("a number")  # "inf" and "nan" are refused as well

    def _describe(self, noun: str) -> str:
        noun = "an integer" if self.kind is int else noun
        if self.low is not None and self.high is not None:
            left = "(" if self.low_open else "["
            right = ")" if self.high_open else "]"
            noun = "an integer" if self.kind is int else "a number"
            return f"{noun} in {left}{self.low:g}, {self.high:g}{right}"
        if self.low is not None:
            return f"{noun} {'>' if self.low_open else '≥'} {self.low:g}"
        if self.high is not None:
            return f"{noun} {'<' if self.high_open else '≤'} {self.high:g}"
        return noun

    def check(self, value: Any) -> Any:
        if isinstance(value, (bool, np.bool_)):
            raise ConfigError(self.describe)
        if self.kind is int:
            if not isinstance(value, (int, np.integer)):
                raise ConfigError(self.describe)
            value = int(value)
        else:
            if not isinstance(value, (int, float, np.integer, np.floating)):
                raise ConfigError(self.describe)
            value = float(value)
            if not math.isfinite(value):
                raise ConfigError(self.describe)
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            raise ConfigError(self.describe)
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            raise ConfigError(self.describe)
        return value

    def parse(self, text: str) -> Any:
        try:
            value = self.kind(text)
        except (TypeError, ValueError):
            raise ConfigError(self.describe) from None
        return self.check(value)


@dataclass(frozen=True)
class Numbers(Kind):
    """A list of finite numbers, each ≥ ``low`` (> with ``low_open``); on the command
    line, separated by commas. ``note``: what else holds, for messages (e.g. "summing to
    1"); how many, and the note, are the method's cross-field check."""

    low: float = 0.0
    low_open: bool = False
    note: str = ""

    @property
    def _each(self) -> str:
        return f"{'>' if self.low_open else '≥'} {self.low:g}"

    @property
    def describe(self) -> str:  # type: ignore[override]
        return f"a list of numbers {self._each}" + (f" {self.note}" if self.note else "")

    @property
    def cli_describe(self) -> str:
        return f"numbers {self._each} separated by commas" + (
            f" ({self.note})" if self.note else ""
        )

    def check(self, value: Any) -> Any:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(self.describe)
        one = Number(float, self.low, None, self.low_open)
        return [one.check(v) for v in value]

    def parse(self, text: str) -> Any:
        try:
            values = [float(part) for part in text.split(",")]
        except ValueError:
            raise ConfigError(self.describe) from None
        return self.check(values)

    def argparse_options(self) -> dict[str, Any]:
        out = super().argparse_options()
        return {**out, "metavar": "X1,X2,..."}


@dataclass(frozen=True)
class Choice(Kind):
    """One of ``values`` (strings)."""

    values: tuple[str, ...] = ()

    @property
    def describe(self) -> str:  # type: ignore[override]
        return "one of " + ", ".join(self.values)

    def check(self, value: Any) -> Any:
        if value not in self.values:
            raise ConfigError(self.describe)
        return value

    def argparse_options(self) -> dict[str, Any]:
        return {"choices": list(self.values)}


@dataclass(frozen=True)
class Switch(Kind):
    """True or false; on the command line ``--flag`` / ``--no-flag``."""

    @property
    def describe(self) -> str:  # type: ignore[override]
        return "true or false"

    def check(self, value: Any) -> Any:
        if not isinstance(value, (bool, np.bool_)):
            raise ConfigError(self.describe)
        return bool(value)

    def argparse_options(self) -> dict[str, Any]:
        return {"action": argparse.BooleanOptionalAction}


@dataclass(frozen=True)
class Text(Kind):
    """A non-empty string (e.g. a model name, checked by the method)."""

    @property
    def describe(self) -> str:  # type: ignore[override]
        return "a non-empty string"

    def check(self, value: Any) -> Any:
        if not isinstance(value, str) or not value:
            raise ConfigError(self.describe)
        return value


#: The common kinds.
EPSILON = Number(float, 0, low_open=True)
DELTA = Number(float, 0, 1, low_open=True, high_open=True)
POSITIVE = Number(float, 0, low_open=True)
SWITCH = Switch()


def option(
    default: Any = MISSING,
    *,
    kind: Kind,
    help: str,
    flag: str | None = None,
    metavar: str | None = None,
    none: str | None = None,
) -> Any:
    """A field of a :class:`MethodOptions` dataclass: ``default`` (omit it for a required
    option), ``kind`` (allowed values), ``help`` (one sentence, no default: that is added),
    ``flag`` (the CLI flag; default ``--`` + the name with dashes), ``metavar`` (CLI),
    ``none``: what None means, for an option that may be None (e.g. "calibrated to the
    budget"); without it None is refused unless it is the default."""
    metadata = {"kind": kind, "help": help, "flag": flag, "metavar": metavar, "none": none}
    return dataclasses.field(default=default, metadata=metadata)


@dataclass(frozen=True)
class OptionSpec:
    """One declared option, as the CLI, sweeps and docs read it."""

    name: str
    kind: Kind
    help: str
    flag: str
    default: Any  # dataclasses.MISSING when required
    metavar: str | None
    none: str | None

    @property
    def required(self) -> bool:
        return self.default is MISSING

    @property
    def allows_none(self) -> bool:
        return self.none is not None or (not self.required and self.default is None)

    def describe_default(self) -> str:
        if self.required:
            return "required"
        if self.default is None:
            return f"none ({self.none})" if self.none else "none"
        if isinstance(self.default, bool):
            return "on" if self.default else "off"
        return f"{self.default:g}" if isinstance(self.default, float) else str(self.default)


@dataclass(frozen=True)
class MethodOptions:
    """Base of every method's options dataclass (frozen; fields made by :func:`option`).

    Construction checks each field against its kind (a ConfigError naming the option and
    its allowed values), then calls :meth:`validate` for checks across fields (which may
    also fill derived defaults with :meth:`_set`)."""

    def __post_init__(self) -> None:
        for spec in specs(type(self)):
            value = getattr(self, spec.name)
            if value is None and spec.allows_none:
                continue
            try:
                self._set(spec.name, spec.kind.check(value))
            except ValueError:
                allowed = spec.kind.describe + (" or None" if spec.allows_none else "")
                raise ConfigError(f"{spec.name} must be {allowed}, got {value!r}") from None
        self.validate()

    def validate(self) -> None:
        """Checks across fields; the default has none."""

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)

    def to_dict(self) -> dict[str, Any]:
        """The options as config.json records them (field order)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def specs(options: type[MethodOptions]) -> list[OptionSpec]:
    """The declared options of an options class, in field order."""
    out = []
    for f in dataclasses.fields(options):
        meta = f.metadata
        if "kind" not in meta:
            raise RuntimeError(f"{options.__name__}.{f.name} must be declared with option()")
        out.append(
            OptionSpec(
                name=f.name,
                kind=meta["kind"],
                help=meta["help"],
                flag=meta["flag"] or "--" + f.name.replace("_", "-"),
                default=f.default,
                metavar=meta["metavar"],
                none=meta["none"],
            )
        )
    return out


def build_options(options: type[MethodOptions], args: Sequence[Any], kwargs: dict[str, Any],
                  owner: str) -> MethodOptions:  # fmt: skip
    """``options(*args, **kwargs)`` with errors that name ``owner`` (the method) and the
    options it takes: one positional value at most (the first option, ε), unknown and
    missing options refused by name."""
    declared = specs(options)
    names = [s.name for s in declared]
    given = dict(kwargs)
    if args:
        if len(args) > 1 or not names:
            raise ConfigError(
                f"method {owner} takes its options by name ({', '.join(names) or 'none'}); "
                f"got {len(args)} positional values"
            )
        if names[0] in given:
            raise ConfigError(f"method {owner}: {names[0]} given twice")
        given[names[0]] = args[0]
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise ConfigError(
            f"method {owner} does not take {', '.join(unknown)}; it takes "
            f"{', '.join(names) or 'no options'}"
        )
    missing = [s.name for s in declared if s.required and s.name not in given]
    if missing:
        raise ConfigError(f"method {owner} needs options: {', '.join(missing)}")
    return options(**given)


@dataclass(frozen=True)
class Flag:
    """One command-line flag and the methods that declare it (dest = the option name)."""

    dest: str
    flag: str
    kind: Kind
    metavar: str | None
    declarations: tuple[tuple[str, OptionSpec], ...]  # (method, spec)

    def help(self) -> str:
        """The declarations' help: one text when they agree, else one per group of methods
        that share it; then the allowed values and each method's real default."""
        by_text: dict[str, list[str]] = {}
        for method, spec in self.declarations:
            by_text.setdefault(spec.help, []).append(method)
        if len(by_text) == 1:
            text = next(iter(by_text))
        else:
            text = "; ".join(f"{', '.join(m)}: {t}" for t, m in by_text.items())
        defaults = {spec.describe_default() for _, spec in self.declarations}
        if len(defaults) == 1:
            default = defaults.pop()
        else:
            default = ", ".join(f"{m} {spec.describe_default()}" for m, spec in self.declarations)
        return f"{text}; {self.kind.describe}; default: {default}"


def flags(methods: Iterable[tuple[str, type[MethodOptions]]]) -> list[Flag]:
    """Every method option as one CLI flag, in first-declaration order; an option name
    declared by several methods must have the same flag and kind in each (else TypeError:
    one flag cannot parse two ways)."""
    found: dict[str, list[tuple[str, OptionSpec]]] = {}
    for method, options in methods:
        for spec in specs(options):
            found.setdefault(spec.name, []).append((method, spec))
    out = []
    for name, declarations in found.items():
        first = declarations[0][1]
        for method, spec in declarations[1:]:
            if spec.flag != first.flag or spec.kind != first.kind:
                raise RuntimeError(
                    f"option {name}: {declarations[0][0]} declares {first.flag} "
                    f"({first.kind.describe}), {method} {spec.flag} ({spec.kind.describe})"
                )
        out.append(Flag(name, first.flag, first.kind, first.metavar, tuple(declarations)))
    return out


def options_markdown(methods: Iterable[tuple[str, type[MethodOptions]]]) -> str:
    """The docs' table of every method's options (docs/METHOD_OPTIONS.md)."""
    lines = [
        "# Method options",
        "",
        "Generated from the declarations in `labeldp/methods/` by "
        "`python -m labeldp.options` (a test keeps this file equal to it). Each option is "
        "a `labeldp train` flag, a key of a sweep file's `[method_options.<method>]` "
        "table or `[grid]` (`<method>.<option>`), and a keyword of the method's class.",
        "",
    ]
    for method, options in methods:
        lines += [f"## {method}", ""]
        declared = specs(options)
        if not declared:
            lines += ["No options.", ""]
            continue
        lines += ["| option | flag | values | default | what it does |", "|---|---|---|---|---|"]
        for s in declared:
            lines.append(
                f"| `{s.name}` | `{s.flag}` | {s.kind.describe} | {s.describe_default()} | "
                f"{s.help} |"
            )
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m labeldp.options > docs/METHOD_OPTIONS.md
    from .methods import METHODS

    print(options_markdown((name, cls.Options) for name, cls in METHODS.items()), end="")
