"""The crossover ε* (labeldp.crossover) against hand computations and curves whose crossing
is known exactly."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from labeldp.crossover import crossover
from labeldp.errors import ConfigError


def test_the_crossing_is_interpolated_linearly_in_log_epsilon():
    # d = -0.05 at ε = 0.5, +0.02 at ε = 1: zero at 5/7 of the way in log ε.
    c = crossover({0.25: 0.5, 0.5: 0.70, 1: 0.80}, {0.25: 0.6, 0.5: 0.75, 1: 0.78})
    assert c.kind == "between" and (c.below, c.above) == (0.5, 1)
    assert c.epsilon == pytest.approx(0.5 * 2 ** (5 / 7))
    assert c.text() == f"{0.5 * 2 ** (5 / 7):.2f} (between ε = 0.5 and 1)"


def test_the_last_sign_change_counts_and_the_grid_ends_are_reported():
    # ahead at 0.1 by chance, behind at 0.5, ahead from 1 on: ε* lies in (0.5, 1)
    c = crossover({0.1: 0.2, 0.5: 0.6, 1: 0.9, 2: 0.95}, {0.1: 0.1, 0.5: 0.7, 1: 0.8, 2: 0.85})
    assert c.kind == "between" and (c.below, c.above) == (0.5, 1)
    ahead = crossover({1: 0.9, 2: 0.95}, {1: 0.8, 2: 0.85})
    assert ahead.kind == "below_grid" and ahead.epsilon is None and ahead.text().startswith("< 1")
    behind = crossover({1: 0.7, 2: 0.85}, {1: 0.8, 2: 0.85})  # a tie is not ahead
    assert behind.kind == "above_grid" and behind.text().startswith("> 2")
    # only the shared ε count
    assert crossover({0.5: 0.1, 1: 0.9, 8: 0.99}, {1: 0.8, 2: 0.85}).kind == "below_grid"


def test_bad_grids_are_refused():
    with pytest.raises(ConfigError, match="share no ε"):
        crossover({1: 0.5}, {2: 0.5})
    with pytest.raises(ConfigError, match="> 0"):
        crossover({0: 0.5, 1: 0.6}, {0: 0.4, 1: 0.7})


@settings(max_examples=60, deadline=None)
@given(  # no subnormals: another test may have set flush-to-zero for the process
    st.floats(min_value=0.12, max_value=7.5, allow_subnormal=False),
    st.floats(min_value=0.01, max_value=0.2, allow_subnormal=False),
    st.floats(min_value=-0.3, max_value=0.3, allow_subnormal=False),
)
def test_a_difference_linear_in_log_epsilon_crosses_where_it_is_zero(star, slope, offset):
    # acc_c − acc_i = slope·(log ε − log ε*) exactly: the interpolation is exact.
    grid = [0.1, 0.2, 0.5, 1, 2, 4, 8]
    incumbent = {e: 0.5 + offset * e for e in grid}
    challenger = {e: incumbent[e] + slope * (math.log(e) - math.log(star)) for e in grid}
    c = crossover(challenger, incumbent)
    assert c.kind == "between" and c.below <= star <= c.above
    assert c.epsilon == pytest.approx(star, rel=1e-6)
