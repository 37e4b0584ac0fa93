"""Declared method options (labeldp.options): one declaration gives the checks, the
recorded options, the CLI flags with their help and defaults, sweep validation and the
docs' table."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest

from labeldp import cli
from labeldp.errors import ConfigError
from labeldp.methods import METHODS, build_method, method_options
from labeldp.methods.base import Method
from labeldp.options import (
    DELTA,
    EPSILON,
    SWITCH,
    Choice,
    MethodOptions,
    Number,
    Numbers,
    flags,
    option,
    options_markdown,
    specs,
)

ROOT = Path(__file__).resolve().parents[1]

#: The smallest valid options of each method (every required option set).
REQUIRED = {
    "none": {},
    "rr": {"epsilon": 1.0},
    "lp-2st": {"epsilon": 1.0},
    "lp-mst": {"epsilon": 1.0},
    "alibi": {"epsilon": 1.0},
    "dp-sgd": {"epsilon": 1.0},
    "labeldp-pro": {"epsilon": 1.0},
    "pate-fm": {"epsilon": 1.0, "teachers": 4, "queries": 10, "threshold": 3.0,
                "sigma1": 1.0, "sigma2": 1.0},  # fmt: skip
}


def test_every_method_is_covered_here():
    assert set(REQUIRED) == set(METHODS)


@pytest.mark.parametrize("name", list(METHODS))
def test_options_round_trip_and_name_the_required(name):
    method = build_method(name, REQUIRED[name])
    again = build_method(name, method.options())
    assert again.options() == method.options()
    assert {s.name for s in method_options(name) if s.required} == set(REQUIRED[name])
    for missing in REQUIRED[name]:
        partial = {k: v for k, v in REQUIRED[name].items() if k != missing}
        with pytest.raises(ConfigError, match=f"method {name} needs options: .*{missing}"):
            build_method(name, partial)
    with pytest.raises(ConfigError, match=f"method {name} does not take bogus; it takes"):
        build_method(name, {**REQUIRED[name], "bogus": 1})


@pytest.mark.parametrize("name", list(METHODS))
def test_every_option_refuses_a_value_of_the_wrong_kind_by_name(name):
    for spec in method_options(name):
        bad = "not a number" if not isinstance(spec.kind, Choice) else "bogus"
        if spec.kind.describe == "a non-empty string":
            bad = 3
        with pytest.raises(ConfigError, match=f"^{spec.name} must be "):
            build_method(name, {**REQUIRED[name], spec.name: bad})


@pytest.mark.parametrize("name", list(METHODS))
def test_the_attributes_are_the_checked_options(name):
    method = build_method(name, REQUIRED[name])
    for key, value in method.options().items():
        assert getattr(method, key) == value


def test_kinds_check_ranges_and_normalize():
    assert Number(float, 0, low_open=True).check(2) == 2.0
    assert isinstance(Number(float).check(2), float)
    with pytest.raises(ValueError):
        Number(float, 0, low_open=True).check(0)
    assert Number(float, 0).check(0) == 0.0
    with pytest.raises(ValueError):
        Number(int, 1).check(1.0)  # an int option refuses floats
    with pytest.raises(ValueError):
        Number(int, 1).check(True)  # and booleans
    with pytest.raises(ValueError):
        Number(float).check(float("nan"))
    with pytest.raises(ValueError):
        DELTA.check(1.0)
    assert DELTA.describe == "a number in (0, 1)"
    assert Number(float, 0, 0.5, high_open=True).describe == "a number in [0, 0.5)"
    assert Numbers(0, low_open=True).parse("0.25,0.75") == [0.25, 0.75]
    with pytest.raises(ValueError):
        Numbers(0, low_open=True).parse("0.25,0")
    with pytest.raises(ValueError):
        SWITCH.check("yes")
    assert Choice(("a", "b")).check("b") == "b"


def test_cross_field_checks_run_after_the_field_checks():
    with pytest.raises(ConfigError, match="stage_fractions must be 3 numbers > 0 summing to 1"):
        build_method("lp-mst", {"epsilon": 1.0, "stages": 3, "stage_fractions": [0.5, 0.5]})
    with pytest.raises(ValueError, match="delta must be None for Laplace"):
        build_method("alibi", {"epsilon": 1.0, "delta": 1e-5})
    # derived defaults are recorded: the paper's stage shares at the nearest ε
    assert build_method("lp-2st", {"epsilon": 1.0}).options()["stage_fractions"][0] == 0.8


def test_one_positional_value_is_the_first_option():
    assert build_method("rr", {"epsilon": 2.0}).options() == METHODS["rr"](2.0).options()
    with pytest.raises(ConfigError, match="by name"):
        METHODS["rr"](2.0, False)
    with pytest.raises(ConfigError, match="given twice"):
        METHODS["rr"](2.0, epsilon=3.0)


def test_a_flag_declared_twice_must_parse_one_way():
    @dataclass(frozen=True)
    class A(MethodOptions):
        delta: float = option(1e-5, kind=DELTA, help="δ")

    @dataclass(frozen=True)
    class B(MethodOptions):
        delta: float = option(1e-5, kind=EPSILON, help="δ")

    with pytest.raises(RuntimeError, match="option delta: a declares --delta"):
        flags([("a", A), ("b", B)])


def test_every_declared_option_is_a_train_flag_with_its_real_default():
    parser = cli.build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]
    actions = {a.dest: a for a in train._actions}
    for name, cls in METHODS.items():
        for spec in specs(cls.Options):
            action = actions[spec.name]
            assert spec.flag in action.option_strings
            assert action.default is argparse.SUPPRESS  # unset flags fall to the recipe
            assert spec.describe_default() in action.help, (name, spec.name, action.help)


def test_adding_an_option_reaches_cli_checks_and_docs():
    """What adding an option takes: one field. It then is a flag, a checked keyword and
    a row of the docs."""

    @dataclass(frozen=True)
    class ToyOptions(MethodOptions):
        epsilon: float = option(kind=EPSILON, help="ε per label")
        rounds: int = option(3, kind=Number(int, 1), metavar="R", help="how many rounds")

    class Toy(Method):
        name: ClassVar[str] = "toy"
        Options: ClassVar[type[MethodOptions]] = ToyOptions

    assert Toy(1.0).rounds == 3 and Toy(1.0, rounds=5).options()["rounds"] == 5
    with pytest.raises(ConfigError, match=r"^rounds must be an integer ≥ 1, got 0$"):
        Toy(1.0, rounds=0)
    [flag] = [f for f in flags([("toy", Toy.Options)]) if f.dest == "rounds"]
    assert flag.flag == "--rounds" and "default: 3" in flag.help()
    assert "| `rounds` | `--rounds` | an integer ≥ 1 | 3 | how many rounds |" in options_markdown(
        [("toy", Toy.Options)]
    )


def test_the_cli_parses_with_the_declared_kinds(capsys):
    parser = cli.build_parser()
    args = parser.parse_args(
        ["train", "--dataset", "fashion-mnist", "--method", "lp-mst", "--epsilon", "2",
         "--stages", "3", "--stage-fractions", "0.5,0.25,0.25", "--no-drop-outside-topk"]
    )  # fmt: skip
    assert cli._method_options(args) == {
        "epsilon": 2.0, "stages": 3, "stage_fractions": [0.5, 0.25, 0.25],
        "drop_outside_topk": False,
    }  # fmt: skip
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--dataset", "fashion-mnist", "--stages", "1"])
    assert "argument --stages: must be an integer ≥ 2, got '1'" in capsys.readouterr().err


def test_the_docs_table_is_generated_from_the_declarations():
    expected = options_markdown((n, cls.Options) for n, cls in METHODS.items())
    committed = (ROOT / "docs" / "METHOD_OPTIONS.md").read_text()
    assert committed == expected, "regenerate: python -m labeldp.options > docs/METHOD_OPTIONS.md"
