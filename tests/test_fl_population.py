"""Client populations (labeldp.fl.population): IID, shards, Dirichlet, sizes, replication."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from labeldp.errors import ConfigError
from labeldp.fl.population import (
    Population,
    client_sizes,
    dirichlet,
    iid,
    shards,
)

FAST = settings(max_examples=25, deadline=None)


def fashion_like(per_class: int = 6000, classes: int = 10, seed: int = 0) -> np.ndarray:
    """A shuffled label vector with ``per_class`` examples of each class."""
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(classes), per_class))


LABELS = fashion_like()  # 60,000 labels, like the Fashion-MNIST training split


def held_once(pop: Population) -> bool:
    """Every example of the dataset is held by exactly one client."""
    return np.array_equal(np.sort(pop.indices), np.arange(pop.num_examples))


def mean_tv(pop: Population, labels: np.ndarray) -> float:
    """Mean total-variation distance of the clients' label mixes from the global one."""
    hist = pop.label_histogram(labels, 10)
    mix = hist / hist.sum(1, keepdims=True)
    return float(0.5 * np.abs(mix - np.bincount(labels) / len(labels)).sum(1).mean())


# --- Population ------------------------------------------------------------------------


def test_population_accessors() -> None:
    pop = Population.from_clients([[4, 1], [0], [2, 3, 1]], 5, "hand-made", False)
    assert pop.num_clients == 3 and pop.num_held == 6 and pop.num_examples == 5
    assert pop.sizes.tolist() == [2, 1, 3]
    assert pop.client(0).tolist() == [1, 4] and pop.client(2).tolist() == [1, 2, 3]
    assert pop.copies().tolist() == [1, 2, 1, 1, 1]
    labels = np.array([0, 1, 1, 2, 0])
    assert pop.label_histogram(labels, 3).tolist() == [[1, 1, 0], [1, 0, 0], [0, 2, 1]]
    assert pop.offsets.dtype == pop.indices.dtype == np.int64
    with pytest.raises(ValueError):
        pop.indices[0] = 3  # read-only
    assert "hand-made" in repr(pop) and "clients=3" in repr(pop)


@pytest.mark.parametrize(
    ("offsets", "indices", "num_examples", "name"),
    [
        ([0, 2, 2], [0, 1], 3, "offsets"),  # an empty client
        ([1, 2], [0, 1], 3, "offsets"),  # does not start at 0
        ([0, 1], [0, 1], 3, "offsets"),  # does not end at len(indices)
        ([0], [], 3, "offsets"),  # no client
        ([0, 2], [0, 3], 3, "indices"),  # out of range
        ([0, 2], [0, -1], 3, "indices"),
        ([0, 2], [0.0, 1.0], 3, "indices"),  # not integers
        ([[0, 2]], [0, 1], 3, "offsets"),  # not 1-D
        ([0, 2], [0, 1], 0, "num_examples"),
    ],
)
def test_population_rejects_inconsistent_fields(
    offsets: list, indices: list, num_examples: int, name: str
) -> None:
    with pytest.raises(ConfigError, match=name):
        Population(np.array(offsets), np.array(indices), num_examples, "x", False)


def test_population_rejects_bad_queries() -> None:
    pop = iid(10, 3, seed=0)
    with pytest.raises(ConfigError, match="client"):
        pop.client(3)
    with pytest.raises(ConfigError, match="client"):
        pop.client(-1)
    with pytest.raises(ConfigError, match="labels"):
        pop.label_histogram(np.zeros(9, dtype=int), 2)  # wrong length
    with pytest.raises(ConfigError, match="labels"):
        pop.label_histogram(np.full(10, 2), 2)  # out of range


# --- client sizes and IID ----------------------------------------------------------------


@FAST
@given(
    kind=st.sampled_from(["equal", "lognormal", "power-law"]),
    num_clients=st.integers(1, 300),
    min_size=st.integers(1, 5),
    slack=st.integers(0, 5000),
    seed=st.integers(0, 2**32),
)
def test_client_sizes_sum_and_minimum(
    kind: str, num_clients: int, min_size: int, slack: int, seed: int
) -> None:
    total = num_clients * min_size + slack
    sizes = client_sizes(kind, num_clients, total, seed, min_size=min_size)
    assert sizes.shape == (num_clients,) and sizes.dtype == np.int64
    assert sizes.sum() == total and sizes.min() >= min_size
    assert np.array_equal(sizes, client_sizes(kind, num_clients, total, seed, min_size=min_size))
    if kind == "equal":
        assert sizes.max() - sizes.min() <= 1


def test_client_sizes_spread() -> None:
    equal = client_sizes("equal", 1000, 600_000, 0)
    lognormal = client_sizes("lognormal", 1000, 600_000, 0, sigma=1.0)
    heavy = client_sizes("power-law", 1000, 600_000, 0, exponent=1.1)
    assert (equal == 600).all()
    # lognormal(σ=1): coefficient of variation sqrt(e − 1) ≈ 1.31
    assert 1.0 < lognormal.std() / lognormal.mean() < 1.7
    assert heavy.max() > 20 * np.median(heavy)  # heavy tail
    assert not np.array_equal(lognormal, client_sizes("lognormal", 1000, 600_000, 1))


@FAST
@given(num_examples=st.integers(1, 500), data=st.data(), seed=st.integers(0, 2**32))
def test_iid_covers_every_example_once(num_examples: int, data: st.DataObject, seed: int) -> None:
    num_clients = data.draw(st.integers(1, num_examples))
    pop = iid(num_examples, num_clients, seed)
    assert held_once(pop) and pop.num_clients == num_clients
    assert pop.sizes.max() - pop.sizes.min() <= 1
    assert not pop.looks_at_labels and pop.layout == "iid"
    assert np.array_equal(pop.indices, iid(num_examples, num_clients, seed).indices)


def test_iid_with_sizes_below_the_dataset_holds_no_example_twice() -> None:
    sizes = client_sizes("lognormal", 50, 4000, seed=3)
    pop = iid(6000, 50, seed=3, sizes=sizes)
    assert np.array_equal(pop.sizes, sizes) and pop.copies().max() == 1


@FAST
@given(
    num_examples=st.integers(1, 300),
    num_clients=st.integers(1, 400),
    extra=st.integers(1, 2000),
    seed=st.integers(0, 2**32),
)
def test_iid_replicates_by_bootstrap(
    num_examples: int, num_clients: int, extra: int, seed: int
) -> None:
    total = max(num_examples + extra, num_clients)
    sizes = client_sizes("lognormal", num_clients, total, seed)
    pop = iid(num_examples, num_clients, seed, sizes=sizes)
    copies = pop.copies()
    assert copies.min() >= 1 and copies.sum() == total == pop.num_held
    assert np.array_equal(pop.sizes, sizes) and pop.layout == "iid(bootstrap)"


def test_more_clients_than_examples() -> None:
    pop = iid(1000, 50_000, seed=0, sizes=client_sizes("equal", 50_000, 50_000, 0))
    assert pop.num_clients == 50_000 and (pop.sizes == 1).all()
    assert pop.copies().min() >= 1 and pop.copies().sum() == 50_000


# --- shards ------------------------------------------------------------------------------


def test_shards_mcmahan() -> None:
    """100 clients × 2 shards of 300 over 60,000 examples of 10 balanced classes."""
    pop = shards(LABELS, 100, seed=0)
    assert held_once(pop) and (pop.sizes == 600).all() and pop.looks_at_labels
    hist = pop.label_histogram(LABELS, 10)
    assert (hist % 300 == 0).all()  # whole single-label shards
    assert ((hist > 0).sum(1) <= 2).all()  # at most two labels per client
    assert ((hist > 0).sum(1) == 1).mean() < 0.3  # and usually two
    assert pop.layout == "shards(shards_per_client=2, shard_size=300)"
    assert np.array_equal(pop.indices, shards(LABELS, 100, seed=0).indices)
    assert not np.array_equal(pop.indices, shards(LABELS, 100, seed=1).indices)


def test_shards_are_cut_from_label_sorted_examples() -> None:
    labels = np.random.default_rng(0).integers(0, 7, size=840)  # unbalanced classes
    pop = shards(labels, 20, seed=5, shards_per_client=3)
    assert held_once(pop) and (pop.sizes == 42).all()
    # A shard is a run of the label-sorted order: it holds 1 + (class boundaries inside
    # it) labels, so the clients' distinct labels total at most 60 shards + 6 boundaries
    # (a random split of 42 examples over 7 classes would show about 7 per client: 140).
    assert (pop.label_histogram(labels, 7) > 0).sum() <= 60 + 6


# --- Dirichlet ---------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.05, 0.1, 0.5, 1, 100])
def test_dirichlet_fashion_settings(alpha: float) -> None:
    pop = dirichlet(LABELS, 100, alpha, seed=0, min_size=10)
    assert held_once(pop) and pop.sizes.min() >= 10 and pop.looks_at_labels
    assert pop.layout.startswith(f"dirichlet(alpha={alpha:g}, min_size=10")


def test_dirichlet_skew_follows_alpha() -> None:
    """An IID split has mean TV ≈ 0.04 and a label-sorted one ≈ 0.9 at 600 per client, so
    neither threshold is met by accident; the ordering in alpha is strict."""
    tv = {a: mean_tv(dirichlet(LABELS, 100, a, seed=1), LABELS) for a in (0.1, 0.5, 1, 100)}
    assert tv[0.1] > 0.6 > tv[0.5] > tv[1] > 0.2 > 0.08 > tv[100]
    assert mean_tv(iid(60_000, 100, seed=1), LABELS) < 0.08  # the reference point
    assert mean_tv(dirichlet(LABELS, 100, 0.05, seed=1), LABELS) > 0.6


def test_dirichlet_is_deterministic_in_the_seed() -> None:
    a = dirichlet(LABELS, 100, 0.5, seed=7)
    b = dirichlet(LABELS, 100, 0.5, seed=7)
    c = dirichlet(LABELS, 100, 0.5, seed=8)
    assert np.array_equal(a.offsets, b.offsets) and np.array_equal(a.indices, b.indices)
    assert not np.array_equal(a.sizes, c.sizes)


@pytest.mark.parametrize("min_size", [1, 6])
def test_dirichlet_ten_thousand_clients(min_size: int) -> None:
    pop = dirichlet(LABELS, 10_000, 0.1, seed=0, min_size=min_size)
    assert held_once(pop) and pop.num_clients == 10_000 and pop.sizes.min() >= min_size
    if min_size == 6:  # 60,000 / 10,000: every client exactly 6, and still skewed
        assert (pop.sizes == 6).all()
        distinct = (pop.label_histogram(LABELS, 10) > 0).sum(1).mean()
        assert distinct < 3.0  # an IID client of 6 has 10·(1 − 0.9⁶) ≈ 4.7 labels


@FAST
@given(
    classes=st.integers(1, 6),
    n=st.integers(20, 400),
    num_clients=st.integers(1, 20),
    alpha=st.sampled_from([0.01, 0.1, 1.0, 50.0]),
    seed=st.integers(0, 2**32),
    data=st.data(),
)
def test_dirichlet_reserve_properties(
    classes: int, n: int, num_clients: int, alpha: float, seed: int, data: st.DataObject
) -> None:
    labels = np.random.default_rng(seed).integers(0, classes, size=n)
    min_size = data.draw(st.integers(1, n // num_clients))
    pop = dirichlet(labels, num_clients, alpha, seed, min_size=min_size)
    assert held_once(pop) and pop.sizes.min() >= min_size


def test_dirichlet_resample_method() -> None:
    pop = dirichlet(LABELS, 100, 1.0, seed=0, method="resample")
    assert held_once(pop) and pop.sizes.min() >= 10 and "method=resample" in pop.layout
    # the plain resampling loop cannot reach min_size 10 at alpha 0.05 (P(success) ≈ 1e-5)
    with pytest.raises(ConfigError, match="alpha.*max_attempts.*min_size.*num_clients"):
        dirichlet(LABELS, 100, 0.05, seed=0, method="resample", max_attempts=5)


def test_dirichlet_replicates_by_bootstrap() -> None:
    labels = fashion_like(per_class=100)  # 1,000 examples
    with pytest.raises(ConfigError, match="min_size"):
        dirichlet(labels, 500, 0.1, seed=0, min_size=3)  # 1,500 > 1,000
    pop = dirichlet(labels, 500, 0.1, seed=0, min_size=3, total=2000)
    copies = pop.copies()
    assert copies.min() >= 1 and copies.sum() == 2000 == pop.num_held
    assert pop.sizes.min() >= 3 and "total=2000" in pop.layout
    # replicas stay in their class: every class is held 200 times
    assert (pop.label_histogram(labels, 10).sum(0) == 200).all()


# --- bad inputs --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda: dirichlet(LABELS, 100, 0, seed=0), "alpha"),
        (lambda: dirichlet(LABELS, 100, -1.0, seed=0), "alpha"),
        (lambda: dirichlet(LABELS, 100, float("nan"), seed=0), "alpha"),
        (lambda: dirichlet(LABELS, 100, float("inf"), seed=0), "alpha"),
        (lambda: dirichlet(LABELS, 100, True, seed=0), "alpha"),
        (lambda: dirichlet(LABELS, 100, "0.1", seed=0), "alpha"),
        (lambda: dirichlet(LABELS, 0, 0.1, seed=0), "num_clients"),
        (lambda: dirichlet(LABELS, 2.5, 0.1, seed=0), "num_clients"),
        (lambda: dirichlet(LABELS, True, 0.1, seed=0), "num_clients"),
        (lambda: dirichlet(LABELS, 100, 0.1, seed=-1), "seed"),
        (lambda: dirichlet(LABELS, 100, 0.1, seed=0, min_size=0), "min_size"),
        (lambda: dirichlet(LABELS, 100, 0.1, seed=0, method="greedy"), "method"),
        (lambda: dirichlet(LABELS, 100, 0.1, seed=0, total=10), "total"),
        (lambda: dirichlet(LABELS, 100, 0.1, seed=0, max_attempts=0), "max_attempts"),
        (lambda: dirichlet(LABELS.reshape(600, 100), 10, 0.1, seed=0), "labels"),
        (lambda: dirichlet(LABELS.astype(float), 10, 0.1, seed=0), "labels"),
        (lambda: dirichlet(LABELS - 1, 10, 0.1, seed=0), "labels"),
        (lambda: dirichlet([], 10, 0.1, seed=0), "labels"),
        (lambda: shards(LABELS, 7, seed=0), "shards_per_client"),  # 14 ∤ 60,000
        (lambda: shards(LABELS, 100, seed=0, shards_per_client=0), "shards_per_client"),
        (lambda: shards(LABELS[:10], 100, seed=0), "num_clients"),
        (lambda: iid(10, 11, seed=0), "num_clients"),
        (lambda: iid(0, 1, seed=0), "num_examples"),
        (lambda: iid(10, 2, seed=0, sizes=[5]), "sizes"),
        (lambda: iid(10, 2, seed=0, sizes=[5, 0]), "sizes"),
        (lambda: iid(10, 2, seed=0, sizes=[5.0, 5.0]), "sizes"),
        (lambda: iid(10, 2, seed="a"), "seed"),
        (lambda: client_sizes("zipf", 10, 100, 0), "kind"),
        (lambda: client_sizes("equal", 10, 9, 0), "total"),
        (lambda: client_sizes("equal", 10, 100, 0, min_size=11), "total"),
        (lambda: client_sizes("lognormal", 10, 100, 0, sigma=-1.0), "sigma"),
        (lambda: client_sizes("power-law", 10, 100, 0, exponent=0.0), "exponent"),
    ],
)
def test_bad_inputs_name_the_parameter(call, name: str) -> None:
    with pytest.raises(ConfigError, match=name):
        call()


def test_label_reading_layouts_say_they_are_public_givens() -> None:
    """The spec's privacy note: partitions by label are the simulation's public layout."""
    assert iid(10, 2, seed=0).looks_at_labels is False
    for function in (shards, dirichlet):
        doc = " ".join(function.__doc__.split())
        assert "public layout of the federation, not a privacy mechanism" in doc
        assert "not protected by the label-DP guarantee" in doc
