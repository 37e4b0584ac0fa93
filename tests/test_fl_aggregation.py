"""The aggregation pieces of labeldp.fl: staleness weights s(τ) and the fixed-point
(secure-aggregation-compatible) buffer: its sum against the exact real sum, bit-identical
under any chunking and merge order, negative values, overflow clamping and counting, and
the refusal of bad parameters."""

from __future__ import annotations

import dataclasses
import math
import random
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from labeldp.errors import ConfigError
from labeldp.fl.buffer import FixedPoint, FixedPointBuffer, choose_frac_bits
from labeldp.fl.staleness import MAX_EXPONENT, MAX_SLOPE, StalenessWeight

FAST = settings(max_examples=40, deadline=None, derandomize=True)
INT64_MAX = np.iinfo(np.int64).max


# ------------------------------------------------------------------ staleness weights
def test_staleness_kinds():
    tau = np.arange(12)
    assert StalenessWeight("constant")(7) == 1.0
    np.testing.assert_array_equal(StalenessWeight("constant")(tau), np.ones(12))
    # FedBuff's default: 1/√(1 + τ)
    np.testing.assert_allclose(StalenessWeight()(tau), 1 / np.sqrt(1 + tau), rtol=1e-15)
    np.testing.assert_allclose(
        StalenessWeight("polynomial", exponent=2.0)(tau), (1 + tau) ** -2.0, rtol=1e-15
    )
    # FedAsync's hinge, a = 10, b = 4: 1 up to b, then 1/(a(τ − b) + 1)
    hinge = StalenessWeight("hinge", exponent=10.0, limit=4)(tau)
    expected = [1.0] * 5 + [1 / (10 * (t - 4) + 1) for t in range(5, 12)]
    np.testing.assert_allclose(hinge, expected, rtol=1e-15)
    assert StalenessWeight("polynomial", exponent=0)(tau).tolist() == [1.0] * 12


def test_staleness_types_and_range():
    weight = StalenessWeight()
    assert type(weight(3)) is float and weight(3) == 0.5
    assert type(weight(np.int64(3))) is float
    out = weight(np.array([[0, 1], [2, 3]], dtype=np.int32))
    assert out.dtype == np.float64 and out.shape == (2, 2)
    assert weight(np.array([], dtype=np.int64)).shape == (0,)
    # in (0, 1] at the extremes of the parameters and of int64
    extremes = np.array([0, 1, 10**9, INT64_MAX], dtype=np.int64)
    for w in (
        StalenessWeight("polynomial", exponent=MAX_EXPONENT),
        StalenessWeight("hinge", exponent=MAX_SLOPE, limit=0),
        StalenessWeight("hinge", exponent=0.0, limit=3),
    ):
        values = w(extremes)
        assert values[0] == 1.0 and np.all(values > 0) and np.all(values <= 1)
        assert np.all(np.diff(values) <= 0)  # staler never weighs more
    # with and without denormals flushed to zero (every run flushes them): a normal float
    try:
        for flush in (False, True):
            torch.set_flush_denormal(flush)
            assert StalenessWeight("polynomial", exponent=MAX_EXPONENT)(np.uint64(2**64 - 1)) > 0
    finally:
        torch.set_flush_denormal(False)


@pytest.mark.parametrize("tau", [-1, np.array([0, 3, -2]), 1.0, np.array([0.5]), True, "3"])
def test_staleness_refuses_negative_or_non_integer_tau(tau):
    with pytest.raises(ConfigError, match="tau"):
        StalenessWeight()(tau)


@pytest.mark.parametrize(
    ("options", "name"),
    [
        ({"kind": "linear"}, "kind"),
        ({"exponent": -0.5}, "exponent"),
        ({"exponent": math.nan}, "exponent"),
        ({"exponent": MAX_EXPONENT + 1}, "exponent"),
        ({"kind": "hinge", "exponent": math.inf}, "exponent"),
        ({"kind": "hinge", "exponent": 10.0, "limit": -1}, "limit"),
        ({"kind": "hinge", "exponent": 10.0, "limit": 2.5}, "limit"),
        ({"exponent": True}, "exponent"),
    ],
)
def test_staleness_refuses_bad_parameters(options, name):
    with pytest.raises(ConfigError, match=name):
        StalenessWeight(**options)


def test_staleness_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        StalenessWeight().exponent = 1.0  # type: ignore[misc]


# ---------------------------------------------------------------- fixed-point encoding
def test_negative_values_round_trip():
    fp = FixedPoint(frac_bits=16, total_bits=40)
    values = torch.tensor([-3.25, -1e-3, -0.0, 0.0, 2.5, -(2.0**23) + 1, 2.0**23 - 1])
    residues = fp.encode(values)
    assert residues.dtype == torch.int64
    assert residues.min() >= 0 and residues.max() < 2**40
    expected = torch.round(values.double() * 2**16) / 2**16
    torch.testing.assert_close(fp.decode(residues), expected, rtol=0, atol=0)
    # a negative value is the residue 2^b − |x|; adding it to its opposite gives 0
    assert fp.encode(torch.tensor([-1.0])).item() == 2**40 - 2**16
    assert fp.add(fp.encode(values), fp.encode(-values)).eq(0).all()
    # the sum of a negative and a positive value, through residues
    total = fp.add(fp.encode(torch.tensor([1.5])), fp.encode(torch.tensor([-4.0])))
    assert fp.decode(total).item() == -2.5


def test_encoding_clamps_to_the_signed_range_and_rounds_half_to_even():
    fp = FixedPoint(frac_bits=0, total_bits=8)
    values = torch.tensor([1000.0, -1000.0, 1e300, 0.5, 1.5, 2.5, -0.5], dtype=torch.float64)
    assert fp.decode(fp.encode(values)).tolist() == [127, -127, 127, 0, 2, 2, -0]
    assert fp.quantize(values)[1] == 3
    with pytest.raises(ConfigError, match="finite"):
        fp.encode(torch.tensor([0.0, math.nan]))
    with pytest.raises(ConfigError, match="finite"):
        fp.encode(torch.tensor([math.inf]))


@pytest.mark.parametrize(
    ("options", "name"),
    [
        ({"frac_bits": -1}, "frac_bits"),
        ({"frac_bits": 1024}, "frac_bits"),
        ({"frac_bits": 2.0}, "frac_bits"),
        ({"frac_bits": 8, "total_bits": 0}, "total_bits"),
        ({"frac_bits": 8, "total_bits": 63}, "total_bits"),
        ({"frac_bits": 8, "total_bits": True}, "total_bits"),
    ],
)
def test_fixed_point_refuses_bad_parameters(options, name):
    with pytest.raises(ConfigError, match=name):
        FixedPoint(**options)


def test_fixed_point_refuses_bad_residues():
    fp = FixedPoint(frac_bits=4, total_bits=8)
    good = fp.encode(torch.zeros(3))
    for bad in (torch.tensor([0, 256, 1]), torch.tensor([-1, 0, 0]), good.int(), good.double()):
        with pytest.raises(ConfigError):
            fp.add(good, bad)
        with pytest.raises(ConfigError):
            fp.decode(bad)
    with pytest.raises(ConfigError, match="shape"):
        fp.add(good, good[:2])


# --------------------------------------------------------------------------- buffer
def _contributions(count: int, size: int, bound: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(count, size, generator=g, dtype=torch.float64) * 2 - 1) * bound


@pytest.mark.parametrize("capacity", [1, 7, 64])
def test_sum_equals_the_exact_sum_within_half_a_step_per_contribution(capacity):
    # b = 50, so the integer sums stay below 2^53 and decode exactly: the bound is exact
    bound, size = 3.0, 40
    f = choose_frac_bits(capacity, bound, total_bits=50)
    buffer = FixedPointBuffer(size, FixedPoint(f, 50), capacity)
    rows = _contributions(capacity, size, bound, seed=capacity)
    for row in rows:
        buffer.add(row)
    assert buffer.count == capacity and buffer.overflows == 0
    total = buffer.total()
    assert total.dtype == torch.float64 and total.shape == (size,)
    tolerance = Fraction(capacity, 2 ** (f + 1))  # K·2^−f/2
    for j in range(size):
        exact = sum(Fraction(v) for v in rows[:, j].tolist())
        assert abs(Fraction(total[j].item()) - exact) <= tolerance
    # the realised error is of that order, not far below it (f is not overly generous)
    assert (total - rows.sum(0)).abs().max() > 2.0**-f / 8


def test_sum_at_62_bits_within_the_bound_plus_float64_rounding():
    capacity, bound, size = 10, 1.0, 1000
    f = choose_frac_bits(capacity, bound)
    assert f == 57
    buffer = FixedPointBuffer(size, FixedPoint(f), capacity)
    rows = _contributions(capacity, size, bound, seed=0).float()  # clients upload float32
    buffer.add(rows)
    exact = torch.tensor([math.fsum(c) for c in rows.double().T.tolist()], dtype=torch.float64)
    slack = capacity * 2.0 ** -(f + 1) + 2 * torch.finfo(torch.float64).eps * exact.abs()
    assert ((buffer.total() - exact).abs() <= slack).all()
    assert buffer.overflows == 0


@FAST
@given(
    capacity=st.integers(1, 12),
    cuts=st.lists(st.integers(0, 12), max_size=6),
    seed=st.integers(0, 2**16),
    total_bits=st.sampled_from([8, 24, 62]),
)
def test_integer_sum_is_bit_identical_under_any_chunking_and_merge_order(
    capacity, cuts, seed, total_bits
):
    size = 9
    bound = 1.5
    fp = FixedPoint(choose_frac_bits(capacity, bound, total_bits), total_bits)
    # some coordinates beyond the bound too, so clamped values are part of the sum
    rows = _contributions(capacity, size, 2.5 * bound, seed)
    reference = FixedPointBuffer(size, fp, capacity)
    for row in rows:
        reference.add(row)

    # random chunks, contributions in random order inside them, merged in random order
    shuffle = random.Random(seed)
    order = list(range(capacity))
    shuffle.shuffle(order)
    edges = sorted({0, capacity, *(c for c in cuts if c <= capacity)})
    chunks = []
    for start, stop in zip(edges, edges[1:], strict=False):
        chunk = FixedPointBuffer(size, fp, capacity)
        picked = order[start:stop]
        if shuffle.random() < 0.5:
            chunk.add(rows[picked])  # several rows at once
        else:
            for i in picked:
                chunk.add(rows[i])
        chunks.append(chunk)
    shuffle.shuffle(chunks)
    merged = FixedPointBuffer(size, fp, capacity)
    for chunk in chunks:
        merged.merge(chunk)

    assert torch.equal(merged.residues(), reference.residues())
    assert torch.equal(merged.total(), reference.total())
    assert (merged.count, merged.overflows) == (reference.count, reference.overflows)
    # the residues are the plain integer sum of the clamped encodings, mod 2^b
    integers, _ = fp.quantize(rows, reference.bound)
    assert torch.equal(reference.residues(), torch.remainder(integers.sum(0), fp.modulus))


def test_overflow_is_counted_and_clamped_so_the_sum_never_wraps():
    capacity = 4
    fp = FixedPoint(frac_bits=2, total_bits=8)  # signed range ±127, per contribution ±31
    buffer = FixedPointBuffer(3, fp, capacity)
    assert buffer.bound == 127 // capacity == 31
    big = torch.tensor([100.0, -100.0, 1.0])  # 400 and −400 in units of 2^−2: clamped
    for _ in range(capacity):
        buffer.add(big)
    assert buffer.overflows == 2 * capacity
    # clamped: 4·31 = 124 units = 31.0, with the right sign (no wrap to the other side)
    assert buffer.total().tolist() == [31.0, -31.0, 4.0]
    # without the per-contribution clamp the same sum wraps around: 4·127 mod 256 → −4
    raw = fp.encode(big)
    wrapped = raw
    for _ in range(capacity - 1):
        wrapped = fp.add(wrapped, raw)
    assert fp.decode(wrapped)[0].item() < 0
    # the worst case, every contribution at ±bound, stays inside the signed range
    worst = FixedPointBuffer(1, fp, capacity)
    for _ in range(capacity):
        worst.add(torch.tensor([1e9]))
    assert worst.total().item() == capacity * 31 / 4 > 0
    buffer.reset()
    assert (buffer.count, buffer.overflows) == (0, 0) and buffer.total().eq(0).all()


def test_choose_frac_bits_is_the_largest_safe_f():
    for capacity, bound, bits in [(1, 1.0, 62), (10, 1.0, 62), (1000, 0.3, 62), (3, 5.0, 20)]:
        f = choose_frac_bits(capacity, bound, bits)
        assert capacity * Fraction(bound) * 2**f < 2 ** (bits - 1)
        buffer = FixedPointBuffer(2, FixedPoint(f, bits), capacity)
        buffer.add(torch.tensor([bound, -bound], dtype=torch.float64))
        assert buffer.overflows == 0
        # one more bit would break a condition: the sum bound, or a clamp of ±bound
        bigger = FixedPointBuffer(2, FixedPoint(f + 1, bits), capacity)
        bigger.add(torch.tensor([bound, -bound], dtype=torch.float64))
        assert capacity * Fraction(bound) * 2 ** (f + 1) >= 2 ** (bits - 1) or bigger.overflows
    assert choose_frac_bits(1, 1e-300) == 1023  # capped so that 2^f stays finite


@pytest.mark.parametrize(
    ("args", "name"),
    [
        ((0, 1.0), "capacity"),
        ((2.0, 1.0), "capacity"),
        ((10, 0.0), "bound"),
        ((10, -1.0), "bound"),
        ((10, math.inf), "bound"),
        ((10, 1.0, 63), "total_bits"),
        ((10, 2.0**62), "bound"),  # K·bound ≥ 2^61 even at f = 0
        ((200, 1.0, 8), "capacity"),  # more contributions than the signed range holds
    ],
)
def test_choose_frac_bits_refuses_bad_parameters(args, name):
    with pytest.raises(ConfigError, match=name):
        choose_frac_bits(*args)


def test_buffer_refuses_bad_use():
    fp = FixedPoint(frac_bits=20)
    for kwargs, name in [
        ({"size": 0, "fixed_point": fp, "capacity": 2}, "size"),
        ({"size": 3, "fixed_point": 20, "capacity": 2}, "fixed_point"),
        ({"size": 3, "fixed_point": fp, "capacity": 0}, "capacity"),
        ({"size": 3, "fixed_point": FixedPoint(0, 1), "capacity": 1}, "capacity"),
    ]:
        with pytest.raises(ConfigError, match=name):
            FixedPointBuffer(**kwargs)
    buffer = FixedPointBuffer(3, fp, capacity=2)
    with pytest.raises(ConfigError, match="size"):
        buffer.add(torch.zeros(4))
    with pytest.raises(ConfigError, match="tensor"):
        buffer.add(torch.zeros(2, 2, 3))
    with pytest.raises(ConfigError, match="finite"):
        buffer.add(torch.tensor([0.0, math.nan, 1.0]))
    with pytest.raises(ConfigError, match="capacity"):
        buffer.add(torch.zeros(3, 3))  # three contributions into a buffer of two
    assert buffer.count == 0  # a refused add adds nothing
    buffer.add(torch.ones(3))
    other = FixedPointBuffer(3, fp, capacity=2)
    other.add(torch.ones(2, 3))
    with pytest.raises(ConfigError, match="capacity"):
        buffer.merge(other)  # 1 + 2 > 2
    for mismatch in (
        FixedPointBuffer(4, fp, 2),
        FixedPointBuffer(3, FixedPoint(21), 2),
        FixedPointBuffer(3, fp, 3),
    ):
        with pytest.raises(ConfigError, match="differ"):
            buffer.merge(mismatch)
    assert buffer.count == 1 and buffer.total().tolist() == [1.0, 1.0, 1.0]
