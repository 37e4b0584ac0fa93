"""Client populations: which dataset examples each simulated client holds.

A :class:`Population` stores the layout CSR-style, so that it scales to millions of
clients: client ``i`` holds the example indices ``indices[offsets[i]:offsets[i + 1]]``
(sorted, into a dataset of ``num_examples`` examples). An example may be held by several
clients when the population replicates examples (more held examples than the dataset
has, by bootstrap); replicas are the same index, so a label randomized once per example
is the same at every replica.

Constructors (all numpy; each takes a non-negative integer ``seed`` and is a deterministic
function of its arguments; give it a seed of its own, derived from the run's seed, so that
the layout is independent of every other random draw):

- :func:`iid`: a random split, into near-equal parts or into given sizes
  (see :func:`client_sizes`: equal, lognormal or power-law sizes);
- :func:`shards`: McMahan et al. (2017): sort by label, cut into equal shards, deal a few
  shards to each client;
- :func:`dirichlet`: per class, proportions over clients from Dirichlet(α), with a
  minimum client size.

Privacy. :func:`shards` and :func:`dirichlet` read the true labels. In a simulation the
partition they produce is the given, public layout of the federation (in a real
federation it is simply what each device holds); it is not a privacy mechanism, and
whatever the layout reveals about labels is outside the label-DP guarantee, which covers
only the randomization of labels at the clients. Such populations say
``looks_at_labels=True``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from labeldp.errors import ConfigError, check_int

SIZE_KINDS = ("equal", "lognormal", "power-law")
DIRICHLET_METHODS = ("reserve", "resample")


@dataclass(frozen=True, eq=False)
class Population:
    """Which examples each of ``num_clients`` clients holds.

    ``offsets`` (int64, shape (num_clients + 1,), ``offsets[0] == 0``, strictly increasing:
    every client holds at least one example) cuts ``indices`` (int64 example indices in
    0..num_examples-1, sorted within each client) into the clients' holdings.
    ``layout`` says how the population was made (e.g. ``"iid"``,
    ``"dirichlet(alpha=0.1, min_size=10, method=reserve)"``); ``looks_at_labels`` whether
    making it read the labels (then it is a public given of the simulation, never a
    privacy mechanism). The arrays are stored as read-only int64 copies. Raises
    ``ConfigError`` for inconsistent fields.
    """

    offsets: np.ndarray
    indices: np.ndarray
    num_examples: int
    layout: str
    looks_at_labels: bool

    def __post_init__(self) -> None:
        num_examples = _int("num_examples", self.num_examples, 1)
        offsets = _int_array("offsets", self.offsets)
        indices = _int_array("indices", self.indices)
        if not isinstance(self.layout, str) or not self.layout:
            raise ConfigError(f"layout must be a non-empty string, got {self.layout!r}")
        if not isinstance(self.looks_at_labels, (bool, np.bool_)):
            raise ConfigError(f"looks_at_labels must be a bool, got {self.looks_at_labels!r}")
        if len(offsets) < 2 or offsets[0] != 0 or offsets[-1] != len(indices):
            raise ConfigError(
                f"offsets must start at 0, end at len(indices) = {len(indices)} and have at "
                f"least 2 entries (one client), got {len(offsets)} entries"
                + (f" from {offsets[0]} to {offsets[-1]}" if len(offsets) else "")
            )
        empty = np.flatnonzero(np.diff(offsets) < 1)
        if empty.size:
            raise ConfigError(
                f"offsets must be strictly increasing: every client holds at least one "
                f"example, but client {empty[0]} holds {offsets[empty[0] + 1] - offsets[empty[0]]}"
            )
        if indices.min() < 0 or indices.max() >= num_examples:
            raise ConfigError(
                f"indices must lie in 0..{num_examples - 1} (num_examples={num_examples}), "
                f"found values from {indices.min()} to {indices.max()}"
            )
        object.__setattr__(self, "num_examples", num_examples)
        object.__setattr__(self, "offsets", offsets)
        object.__setattr__(self, "indices", indices)
        object.__setattr__(self, "looks_at_labels", bool(self.looks_at_labels))

    @classmethod
    def from_clients(
        cls,
        clients: Sequence[Sequence[int] | np.ndarray],
        num_examples: int,
        layout: str,
        looks_at_labels: bool,
    ) -> Population:
        """A population from one sequence of example indices per client."""
        parts = [_int_array(f"clients[{i}]", c) for i, c in enumerate(clients)]
        if not parts:
            raise ConfigError("clients is empty; a population needs at least one client")
        ids = np.repeat(np.arange(len(parts)), [len(p) for p in parts])
        return _pack(ids, np.concatenate(parts), len(parts), num_examples, layout, looks_at_labels)

    def __repr__(self) -> str:
        return (
            f"Population({self.layout}, clients={self.num_clients}, "
            f"examples={self.num_examples}, held={self.num_held})"
        )

    @property
    def num_clients(self) -> int:
        """The number of clients (≥ 1)."""
        return len(self.offsets) - 1

    @property
    def num_held(self) -> int:
        """The number of (client, example) pairs; above ``num_examples`` when replicated."""
        return len(self.indices)

    @property
    def sizes(self) -> np.ndarray:
        """Examples held per client (int64, shape (num_clients,), each ≥ 1)."""
        return np.diff(self.offsets)

    def client(self, i: int) -> np.ndarray:
        """The sorted example indices client ``i`` (0..num_clients-1) holds (read-only)."""
        i = _int("client", i, 0)
        if i >= self.num_clients:
            raise ConfigError(f"client must be in 0..{self.num_clients - 1}, got {i}")
        return self.indices[self.offsets[i] : self.offsets[i + 1]]

    def copies(self) -> np.ndarray:
        """How many clients hold each example (int64, shape (num_examples,))."""
        return np.bincount(self.indices, minlength=self.num_examples)

    def label_histogram(self, labels: Sequence[int] | np.ndarray, num_classes: int) -> np.ndarray:
        """Counts of each label per client (int64, shape (num_clients, num_classes)).

        A diagnostic of the simulation: it reads the true ``labels`` (shape
        (num_examples,), values 0..num_classes-1), so it is not for release.
        """
        num_classes = _int("num_classes", num_classes, 1)
        labels = _labels(labels, num_classes)
        if len(labels) != self.num_examples:
            raise ConfigError(
                f"labels must have one entry per example ({self.num_examples}), got {len(labels)}"
            )
        ids = np.repeat(np.arange(self.num_clients), self.sizes)
        flat = np.bincount(
            ids * num_classes + labels[self.indices], minlength=self.num_clients * num_classes
        )
        return flat.reshape(self.num_clients, num_classes)


# --- constructors ----------------------------------------------------------------------


def client_sizes(
    kind: str,
    num_clients: int,
    total: int,
    seed: int,
    *,
    min_size: int = 1,
    sigma: float = 1.0,
    exponent: float = 1.5,
) -> np.ndarray:
    """``num_clients`` client sizes (int64, each ≥ ``min_size``) summing exactly to ``total``.

    Each client gets ``min_size`` examples plus a share of the remaining
    ``total - num_clients * min_size`` proportional to a random weight (largest-remainder
    rounding): ``"equal"`` (no randomness; sizes differ by at most one, larger first),
    ``"lognormal"`` (weight exp(σ·Z), Z standard normal; ``sigma`` ≥ 0) or ``"power-law"``
    (Pareto weight with P(W > w) = w^(−exponent) for w ≥ 1; ``exponent`` > 0, smaller is
    heavier-tailed). Pass the result to :func:`iid` as ``sizes``; a ``total`` above the
    dataset size makes :func:`iid` replicate examples. Raises ``ConfigError`` for bad
    arguments, including ``total < num_clients * min_size``.
    """
    if kind not in SIZE_KINDS:
        raise ConfigError(f"kind must be one of {', '.join(SIZE_KINDS)}, got {kind!r}")
    num_clients = _int("num_clients", num_clients, 1)
    total = _int("total", total, 1)
    min_size = _int("min_size", min_size, 1)
    sigma = _real("sigma", sigma, low=0.0, strict=False)
    exponent = _real("exponent", exponent, low=0.0, strict=True)
    rng = _rng(seed)
    if total < num_clients * min_size:
        raise ConfigError(
            f"total must be at least num_clients × min_size = {num_clients} × {min_size} = "
            f"{num_clients * min_size}, got {total}; lower num_clients or min_size"
        )
    if kind == "equal":
        log_weights = np.zeros(num_clients)
    elif kind == "lognormal":
        log_weights = sigma * rng.standard_normal(num_clients)
    else:  # log of a Pareto(exponent) variable is Exponential / exponent
        log_weights = rng.standard_exponential(num_clients) / exponent
    weights = np.exp(log_weights - log_weights.max())  # no overflow for heavy tails
    return min_size + _apportion(weights, total - num_clients * min_size)


def iid(
    num_examples: int,
    num_clients: int,
    seed: int,
    *,
    sizes: Sequence[int] | np.ndarray | None = None,
) -> Population:
    """An IID population: a uniformly random split of the examples 0..num_examples-1.

    Without ``sizes`` the clients get near-equal parts (differing by at most one) covering
    every example once; this needs ``num_clients ≤ num_examples``. With ``sizes`` (one
    integer ≥ 1 per client, e.g. from :func:`client_sizes`), client ``i`` gets
    ``sizes[i]`` examples. If ``sum(sizes) ≤ num_examples`` no example is held twice;
    otherwise every example is held at least once and the ``sum(sizes) - num_examples``
    extra holdings are a bootstrap sample (uniform, with replacement) of the examples,
    so a client may hold two copies of one example. Labels are never read.
    """
    num_examples = _int("num_examples", num_examples, 1)
    num_clients = _int("num_clients", num_clients, 1)
    rng = _rng(seed)
    if sizes is None:
        if num_clients > num_examples:
            raise ConfigError(
                f"num_clients must be at most num_examples = {num_examples} for an equal "
                f"split, got {num_clients}; for more clients than examples pass sizes "
                "(e.g. client_sizes('equal', num_clients, total, seed)) to replicate examples"
            )
        sizes = _apportion(np.ones(num_clients), num_examples)
    else:
        sizes = _int_array("sizes", sizes)
        if len(sizes) != num_clients or sizes.min() < 1:
            raise ConfigError(
                f"sizes must hold one integer ≥ 1 per client ({num_clients}), got "
                f"{len(sizes)} entries with minimum {sizes.min()}"
            )
    total = int(sizes.sum())
    stream = rng.permutation(num_examples)
    if total <= num_examples:
        stream, layout = stream[:total], "iid"
    else:
        extra = rng.integers(0, num_examples, size=total - num_examples)
        stream, layout = rng.permutation(np.concatenate([stream, extra])), "iid(bootstrap)"
    ids = np.repeat(np.arange(num_clients), sizes)
    return _pack(ids, stream, num_clients, num_examples, layout, looks_at_labels=False)


def shards(
    labels: Sequence[int] | np.ndarray,
    num_clients: int,
    seed: int,
    *,
    shards_per_client: int = 2,
) -> Population:
    """McMahan et al. (2017) shards: sort the examples by label (ties in random order),
    cut them into ``num_clients * shards_per_client`` equal shards, and give each client
    ``shards_per_client`` shards drawn at random without replacement. Every example is held
    exactly once; the number of shards must divide the number of examples (60,000
    Fashion-MNIST examples, 100 clients, 2 per client: 200 shards of 300).

    ``labels``: shape (num_examples,), integer classes ≥ 0. The partition reads the
    labels: in a simulation it is the given, public layout of the federation, not a
    privacy mechanism; the labels it reads are not protected by the label-DP guarantee.
    """
    labels = _labels(labels)
    num_clients = _int("num_clients", num_clients, 1)
    shards_per_client = _int("shards_per_client", shards_per_client, 1)
    rng = _rng(seed)
    n, count = len(labels), num_clients * shards_per_client
    if n % count:
        raise ConfigError(
            f"num_clients × shards_per_client = {num_clients} × {shards_per_client} = {count} "
            f"shards must divide the {n} examples into equal shards; change num_clients, "
            "shards_per_client or the number of examples"
        )
    shard = _by_label(labels, rng).reshape(count, n // count)
    dealt = rng.permutation(count).reshape(num_clients, shards_per_client)
    ids = np.repeat(np.arange(num_clients), shards_per_client * (n // count))
    layout = f"shards(shards_per_client={shards_per_client}, shard_size={n // count})"
    return _pack(ids, shard[dealt].ravel(), num_clients, n, layout, looks_at_labels=True)


def dirichlet(
    labels: Sequence[int] | np.ndarray,
    num_clients: int,
    alpha: float,
    seed: int,
    *,
    min_size: int = 10,
    total: int | None = None,
    method: str = "reserve",
    max_attempts: int = 100,
) -> Population:
    """Label-skewed clients: the examples of each class are split over the clients by
    proportions drawn from Dirichlet(alpha · 1) (Yurochkin et al. 2019; Hsu et al. 2019),
    every client holding at least ``min_size`` examples.

    ``alpha`` > 0 (finite): small values (0.05, 0.1) give clients dominated by one or two
    labels, large ones (100) near-IID clients. Each class's examples are cut in a random
    order at the cumulative proportions (rounded down). The minimum size is enforced by
    ``method``:

    - ``"reserve"`` (default; always succeeds when feasible): each client first receives
      ``min_size`` examples whose labels are drawn from its own expected label mix under
      the same Dirichlet draw (so the floor keeps the skew), within what each class has
      left; then the rest of each class is split by the proportions. Works for any alpha
      and up to ``num_clients * min_size`` = the number of held examples.
    - ``"resample"``: the common loop (e.g. NIID-Bench): redraw all proportions until every
      client holds ``min_size``, at most ``max_attempts`` times, else ``ConfigError``. It
      samples the Dirichlet layout conditioned on the minimum, but fails for small alpha
      or many clients (Dirichlet(0.05), 100 clients, min_size 10 over 60,000 examples
      almost never succeeds).

    ``total`` (default: the number of examples) is the number of held examples; above
    the number of examples, each class is replicated by bootstrap (every example held at
    least once, the extras drawn with replacement from its class, classes in proportion
    to their sizes) before the split. ``labels``: shape (num_examples,), integer classes
    ≥ 0.

    The partition reads the labels: in a simulation it is the given, public layout of the
    federation, not a privacy mechanism; the labels it reads are not protected by the
    label-DP guarantee.
    """
    labels = _labels(labels)
    num_clients = _int("num_clients", num_clients, 1)
    alpha = _real("alpha", alpha, low=0.0, strict=True)
    min_size = _int("min_size", min_size, 1)
    max_attempts = _int("max_attempts", max_attempts, 1)
    if method not in DIRICHLET_METHODS:
        raise ConfigError(f"method must be one of {', '.join(DIRICHLET_METHODS)}, got {method!r}")
    rng = _rng(seed)
    n = len(labels)
    total = n if total is None else _int("total", total, n)
    if num_clients * min_size > total:
        raise ConfigError(
            f"num_clients × min_size = {num_clients} × {min_size} = {num_clients * min_size} "
            f"exceeds the {total} held examples; lower min_size or num_clients, or replicate "
            f"examples with total ≥ {num_clients * min_size}"
        )
    pools = np.split(_by_label(labels, rng), np.cumsum(np.bincount(labels))[:-1])
    if total > n:
        extra = _apportion(np.array([len(p) for p in pools], dtype=float), total - n)
        pools = [
            rng.permutation(np.append(p, rng.choice(p, e)))
            for p, e in zip(pools, extra, strict=True)
        ]
    have = np.array([len(p) for p in pools], dtype=np.int64)
    if method == "reserve":
        props = _proportions(rng, num_clients, alpha, len(pools))
        floor = _reserve(props, have, min_size, rng)
        counts = floor + _split(props, have - floor.sum(0))
    else:
        for _ in range(max_attempts):
            counts = _split(_proportions(rng, num_clients, alpha, len(pools)), have)
            if counts.sum(1).min() >= min_size:
                break
        else:
            raise ConfigError(
                f"no Dirichlet(alpha={alpha:g}) draw in max_attempts={max_attempts} attempts "
                f"gave each of the num_clients={num_clients} clients min_size={min_size} "
                "examples; raise alpha or max_attempts, lower min_size or num_clients, or "
                "use method='reserve'"
            )
    ids = np.concatenate([np.repeat(np.arange(num_clients), c) for c in counts.T])
    bootstrap = f", total={total} (bootstrap)" if total > n else ""
    layout = f"dirichlet(alpha={alpha:g}, min_size={min_size}, method={method}{bootstrap})"
    return _pack(ids, np.concatenate(pools), num_clients, n, layout, looks_at_labels=True)


# --- helpers ---------------------------------------------------------------------------


def _proportions(
    rng: np.random.Generator, num_clients: int, alpha: float, num_classes: int
) -> np.ndarray:
    """Shape (num_clients, num_classes): column k, class k's shares, is Dirichlet(alpha · 1)."""
    return rng.dirichlet(np.full(num_clients, alpha), size=num_classes).T


def _split(props: np.ndarray, have: np.ndarray) -> np.ndarray:
    """Counts (clients, K): ``have[k]`` items of class k cut at the cumulative
    proportions ``props[:, k]`` (rounded down; the last cut at ``have[k]``)."""
    cuts = np.floor(np.cumsum(props, axis=0) * have).astype(np.int64)
    cuts[-1] = have
    cuts = np.maximum.accumulate(np.minimum(cuts, have), axis=0)
    return np.diff(cuts, axis=0, prepend=0)


def _reserve(
    props: np.ndarray, have: np.ndarray, min_size: int, rng: np.random.Generator
) -> np.ndarray:
    """Counts (clients, K) giving each client ``min_size`` examples, drawn from its own
    expected label mix ``props[c] * have`` and never more of a class than it has: draws
    that overfill a class are cancelled at random and redrawn from the classes with room
    (each round fills a class, so it ends within K + 1 rounds)."""
    mix = props * have
    floor = np.zeros(props.shape, dtype=np.int64)
    need = np.full(len(props), min_size, dtype=np.int64)
    for _ in range(props.shape[1] + 1):
        room = have - floor.sum(0)
        weights = mix * (room > 0)
        stuck = weights.sum(1) == 0  # all its mass on full classes (or underflowed)
        weights[stuck] = room
        floor += rng.multinomial(need, weights / weights.sum(1, keepdims=True))
        over = floor.sum(0) - have
        if over.max() <= 0:
            return floor
        need[:] = 0
        for k in np.flatnonzero(over > 0):
            holders = np.repeat(np.arange(len(floor)), floor[:, k])
            cancel = np.bincount(rng.choice(holders, over[k], replace=False), minlength=len(floor))
            floor[:, k] -= cancel
            need += cancel
    raise AssertionError("unreachable: every round fills at least one class")


def _apportion(weights: np.ndarray, amount: int) -> np.ndarray:
    """Non-negative integers (int64) proportional to ``weights`` summing to ``amount``
    (largest remainder; ties go to the earlier entry)."""
    exact = weights / weights.sum() * amount
    parts = np.floor(exact).astype(np.int64)
    order = np.argsort(parts - exact, kind="stable")
    parts[order[: amount - int(parts.sum())]] += 1
    return parts


def _by_label(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The example indices sorted by label, in a random order within each label."""
    perm = rng.permutation(len(labels))
    return perm[np.argsort(labels[perm], kind="stable")]


def _pack(
    ids: np.ndarray,
    examples: np.ndarray,
    num_clients: int,
    num_examples: int,
    layout: str,
    looks_at_labels: bool,
) -> Population:
    """A population from parallel arrays (client id, example index) of every holding."""
    if num_clients * num_examples < 2**62:  # one int64 key sorts much faster than lexsort
        examples = np.sort(ids * np.int64(num_examples) + examples) % num_examples
    else:
        examples = examples[np.lexsort((examples, ids))]
    offsets = np.concatenate([[0], np.cumsum(np.bincount(ids, minlength=num_clients))])
    return Population(offsets, examples, num_examples, layout, looks_at_labels)


def _int(name: str, value: object, low: int) -> int:
    if isinstance(value, np.integer):
        value = int(value)
    return check_int(name, value, low)


def _real(name: str, value: object, *, low: float, strict: bool) -> float:
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        number = float(value)
        if math.isfinite(number) and (number > low if strict else number >= low):
            return number
    relation = ">" if strict else "≥"
    raise ConfigError(f"{name} must be a finite number {relation} {low:g}, got {value!r}")


def _rng(seed: object) -> np.random.Generator:
    return np.random.default_rng(_int("seed", seed, 0))


def _int_array(name: str, value: object) -> np.ndarray:
    """``value`` as a fresh read-only 1-D int64 array; ConfigError naming ``name``."""
    array = np.asarray(value)
    if array.ndim != 1 or not (np.issubdtype(array.dtype, np.integer) or array.size == 0):
        raise ConfigError(
            f"{name} must be a 1-D array of integers, got dtype {array.dtype} of shape "
            f"{array.shape}"
        )
    array = array.astype(np.int64, copy=True)
    array.flags.writeable = False
    return array


def _labels(labels: object, num_classes: int | None = None) -> np.ndarray:
    """``labels`` as a 1-D int64 array of classes in 0..num_classes-1 (any ≥ 0 if None)."""
    array = _int_array("labels", labels)
    if array.size == 0:
        raise ConfigError("labels is empty; a population needs at least one example")
    if array.min() < 0 or (num_classes is not None and array.max() >= num_classes):
        allowed = "≥ 0" if num_classes is None else f"in 0..{num_classes - 1}"
        raise ConfigError(
            f"labels must be class indices {allowed}, found values from "
            f"{array.min()} to {array.max()}"
        )
    return array
