"""The public examples run: every ```python block of README.md (and its inline
``labeldp.runner.train_run(...)`` example), on a tiny fake Fashion-MNIST found through
``$LABELDP_DATA`` as a user's data would be, and every docstring example (``>>>``) in the
``labeldp`` and ``attacks`` packages, as doctests.

The README is run as written; only the names it leaves to the reader (``labels``,
``prior``, ``votes``, ...) are given (:func:`given`). A number in a comment after a bare
expression (``dpsgd_epsilon(...)   # 0.92 (PLD)``) is checked to the digits shown."""

from __future__ import annotations

import ast
import doctest
import importlib
import io
import math
import pkgutil
import re
from pathlib import Path

import numpy as np
import pytest
import torch

# 130 examples: the README's TrainConfig keeps its default batch of 128
pytestmark = pytest.mark.fake_fashion(n_train=130, n_test=40)

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
INLINE_RUN = re.compile(r"`(labeldp\.runner\.train_run\(.*?\))`", re.S)
#: "# 0.92" or "# 0.92 (PLD)" after an expression: the value it shows, to those digits
SHOWN = re.compile(r"#\s*([-+]?\d+\.(\d+))(?:\s|$)")


def readme_blocks() -> list[str]:
    return BLOCK.findall(README.read_text(encoding="utf-8"))


def given() -> dict:
    """The names the README's examples take as the reader's own: labels, a prior over
    them, teacher votes (Q, K) with answered queries, and a generator."""
    g = torch.Generator().manual_seed(0)
    n, k, teachers = 50, 10, 250
    labels = torch.randint(0, k, (n,), generator=g)
    prior = torch.softmax(torch.randn(n, k, generator=g), dim=1)
    rng = np.random.default_rng(0)
    top = rng.integers(0, k, 20)
    votes = np.stack(
        [rng.multinomial(teachers, np.where(np.arange(k) == t, 0.7, 0.3 / (k - 1))) for t in top]
    )
    answered = rng.random(20) < 0.6
    return {
        "labels": labels,
        "prior": prior,
        "votes": votes,
        "answered": answered,
        "generator": torch.Generator().manual_seed(1),
    }


def run_example(source: str, namespace: dict, where: str) -> None:
    """Runs ``source`` statement by statement in ``namespace``; a bare expression followed
    by a comment that starts with a number must evaluate to that number, to the digits
    shown."""
    lines = source.splitlines()
    for statement in ast.parse(source).body:
        code = ast.Module(body=[statement], type_ignores=[])
        if not isinstance(statement, ast.Expr):
            exec(compile(code, where, "exec"), namespace)
            continue
        value = eval(compile(ast.Expression(statement.value), where, "eval"), namespace)
        _, hash_sign, comment = lines[statement.end_lineno - 1].partition("#")
        shown = SHOWN.search(hash_sign + comment) if hash_sign else None
        if shown:
            number, digits = float(shown.group(1)), len(shown.group(2))
            assert abs(float(value) - number) <= 0.5 * 10**-digits, (
                f"{where}, line {statement.end_lineno}: the comment shows {shown.group(1)}, "
                f"the example gives {value}"
            )


@pytest.fixture
def readme_env(data_dir, tmp_path, monkeypatch):
    """The fake data where a user's would be found ($LABELDP_DATA), in a fresh folder."""
    monkeypatch.setenv("LABELDP_DATA", str(data_dir))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


def test_the_readme_has_python_examples():
    assert len(readme_blocks()) >= 4
    assert INLINE_RUN.search(README.read_text(encoding="utf-8"))


@pytest.mark.parametrize("index", range(len(readme_blocks())), ids=lambda i: f"block{i}")
def test_readme_python_block_runs(index, readme_env):
    run_example(readme_blocks()[index], given(), f"README.md python block {index}")


def test_readme_inline_train_run_runs(readme_env):
    import labeldp.runner
    from labeldp.runner import RunConfig
    from labeldp.train import TrainConfig

    call = INLINE_RUN.search(README.read_text(encoding="utf-8")).group(1)
    namespace = {"labeldp": labeldp, "RunConfig": RunConfig, "TrainConfig": TrainConfig}
    metrics = eval(call, namespace)
    assert math.isinf(metrics.epsilon) and (readme_env / "runs" / "x" / "metrics.json").exists()


# ------------------------------------------------------------------- docstring examples
PACKAGES = ("labeldp", "attacks")


def module_names() -> list[str]:
    names = []
    for package in PACKAGES:
        root = importlib.import_module(package)
        names.append(package)
        names += [m.name for m in pkgutil.walk_packages(root.__path__, f"{package}.")]
    return sorted(names)


def test_docstring_examples_run():
    finder = doctest.DocTestFinder(exclude_empty=True)
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    report = io.StringIO()
    runner = doctest.DocTestRunner(optionflags=flags)
    ran = set()
    for name in module_names():
        module = importlib.import_module(name)
        for test in finder.find(module, name):  # globals: a copy of the module's
            if test.examples:
                runner.run(test, out=report.write)
                ran.add(test.name)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, report.getvalue()
    # the finder must see the examples at all (a broken walk would pass vacuously)
    assert "labeldp.mechanisms.rr.RandomizedResponse" in ran, sorted(ran)
