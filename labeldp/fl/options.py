"""The options of a simulated federation, each declared once.

:class:`FederationOptions` is a flat frozen dataclass of :func:`~labeldp.options.option`
fields (the same machinery as the methods' options): its declarations make the checks,
the ``labeldp fl`` flags and their help, the keys a federated sweep file accepts, and the
docs table (``docs/FL_OPTIONS.md``, ``python -m labeldp.fl.options``, kept equal by a
test). :meth:`FederationOptions.config` turns it into the simulator's
:class:`~labeldp.fl.simulator.FederatedConfig`, :func:`build_population` into the
clients' :class:`~labeldp.fl.population.Population`.

Algorithm presets fill what is left unset: fedavg / fedavgm run "sync" rounds of
``concurrency`` clients (fedavgm with server momentum 0.9), fedasync is "async" with
buffer_size 1, fedbuff "async" with buffer_size 10; server_lr 1.

Canaries (``canaries``, ``audit_canaries``; :mod:`attacks.canaries`) are planted as in an
ordinary run: label-independently chosen examples whose labels are replaced before any
client sees a label, the final global model attacked by :mod:`attacks.harness`. The
population is laid out from the true labels, so a canary differs from its neighbour in
its label only; ``canary_clients`` "spread" leaves each canary with the client(s) the
layout dealt it to, "first" moves them all into client 0 (:func:`gather`), so that an
audit measures what one client's data leaks through the global model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..options import DELTA, EPSILON, SWITCH, Choice, MethodOptions, Number, Text, option
from ..options import options_markdown as _markdown
from ..train.ensemble import FORWARDS
from .clients import LocalTraining
from .durations import KINDS as DURATIONS
from .durations import Durations
from .population import Population, client_sizes, dirichlet, iid, shards
from .schedule import ScheduleConfig
from .server import ServerOptimizer
from .simulator import ALGORITHMS, FederatedConfig
from .staleness import StalenessWeight

LAYOUTS = ("iid", "shards", "dirichlet")
SIZES = ("equal", "lognormal", "power-law")
LABEL_PRIVACY = ("none", "rr", "rr-prior", "alibi")
CANARY_CLIENTS = ("spread", "first")
POSITIVE = Number(float, 0, low_open=True)
AT_LEAST_ONE = Number(int, 1)
NON_NEGATIVE = Number(float, 0)


@dataclass(frozen=True)
class FederationOptions(MethodOptions):
    """A federation's options (see the module docstring); ``seed`` is not one of them."""

    algorithm: str = option("fedbuff", kind=Choice(ALGORITHMS), help="the aggregation algorithm")
    layout: str = option(
        "dirichlet", kind=Choice(LAYOUTS),
        help="how examples are dealt to clients (shards and dirichlet read labels: the given, "
        "public layout of the simulated federation, not a privacy mechanism)",
    )  # fmt: skip
    clients: int = option(1000, kind=AT_LEAST_ONE, help="number of clients")
    alpha: float = option(0.1, kind=POSITIVE, help="Dirichlet concentration of the label skew")
    min_size: int = option(1, kind=AT_LEAST_ONE, help="fewest examples a client holds")
    sizes: str = option("equal", kind=Choice(SIZES), help="iid layout: how client sizes are drawn")
    size_sigma: float = option(1.0, kind=POSITIVE, help="lognormal client sizes: σ")
    held: int | None = option(
        None, kind=AT_LEAST_ONE, none="every example once",
        help="iid/dirichlet: examples held in all (more than the dataset: bootstrap replicas)",
    )  # fmt: skip
    concurrency: int = option(
        100, kind=AT_LEAST_ONE, help="async: clients training at once; sync: the cohort M"
    )
    buffer_size: int | None = option(
        None, kind=AT_LEAST_ONE, none="fedbuff 10, fedasync 1, sync the cohort",
        help="K: updates per server step (async)",
    )  # fmt: skip
    arrival_rate: float | None = option(
        None, kind=POSITIVE, none="fixed concurrency",
        help="async: Poisson client arrivals per unit of virtual time",
    )  # fmt: skip
    over_selection: float = option(
        0.0, kind=NON_NEGATIVE, help="sync: extra clients dispatched, a fraction of M"
    )
    timeout: float | None = option(
        None,
        kind=POSITIVE,
        none="no timeout",
        help="sync: a round closes this long after it starts",
    )
    durations: str = option(
        "exponential", kind=Choice(DURATIONS), help="distribution of a trip's duration"
    )
    duration_mean: float = option(1.0, kind=POSITIVE, help="mean trip duration (virtual time)")
    duration_spread: float = option(
        0.5, kind=NON_NEGATIVE, help="lognormal σ, or the uniform half-width as a share of the mean"
    )
    speed_sigma: float = option(
        0.0, kind=NON_NEGATIVE, help="σ of each client's persistent lognormal speed factor"
    )
    scale_by_size: bool = option(
        False, kind=SWITCH, help="trip duration proportional to the client's data size"
    )
    server_steps: int = option(200, kind=AT_LEAST_ONE, help="server updates to simulate")
    time_budget: float | None = option(
        None, kind=POSITIVE, none="server_steps alone",
        help="also stop at the first server update at or after this virtual time (compare "
        "algorithms over equal time)",
    )  # fmt: skip
    server_lr: float = option(1.0, kind=POSITIVE, help="server learning rate η_g")
    server_momentum: float | None = option(
        None, kind=Number(float, 0, 1, high_open=True), none="fedavgm 0.9, else 0",
        help="server momentum β",
    )  # fmt: skip
    staleness: str = option(
        "polynomial", kind=Choice(("constant", "polynomial", "hinge")),
        help="staleness weight s(τ): constant 1, (1+τ)^−a, or FedAsync's hinge",
    )  # fmt: skip
    staleness_exponent: float = option(
        0.5, kind=NON_NEGATIVE, help="a of s(τ): the polynomial's exponent or the hinge's slope"
    )
    staleness_limit: int = option(0, kind=Number(int, 0), help="b of the hinge")
    local_lr: float = option(0.05, kind=POSITIVE, help="clients' learning rate η_l")
    local_batch: int = option(10, kind=AT_LEAST_ONE, help="clients' batch size B")
    local_epochs: int = option(1, kind=AT_LEAST_ONE, help="clients' passes over their data")
    local_steps: int | None = option(
        None, kind=AT_LEAST_ONE, none="local_epochs", help="exactly this many local steps"
    )
    local_momentum: float = option(
        0.0, kind=Number(float, 0, 1, high_open=True), help="clients' SGD momentum"
    )
    label_privacy: str = option(
        "none", kind=Choice(LABEL_PRIVACY),
        help="label DP at the clients: each label released once (rr, rr-prior, alibi)",
    )  # fmt: skip
    epsilon: float | None = option(
        None, kind=EPSILON, none="no label DP", help="ε per label (replace one label)"
    )
    clip: float | None = option(
        None, kind=POSITIVE, none="no clipping", help="user-level DP: L2 clip C of each update"
    )
    noise_multiplier: float = option(
        0.0, kind=NON_NEGATIVE, help="user-level DP: σ (noise σ·C on each server step's sum)"
    )
    participation_cap: int | None = option(
        None, kind=AT_LEAST_ONE, none="no cap", help="most trips per client (user-level DP's m)"
    )
    delta: float = option(1e-5, kind=DELTA, help="δ of the user-level (ε, δ)")
    canaries: int = option(
        0, kind=Number(int, 0),
        help="memorization canaries: training labels replaced by a random wrong one before "
        "any client sees a label (attacks.canaries); the final global model is attacked "
        "(attack.json)",
    )  # fmt: skip
    audit_canaries: int = option(
        0, kind=Number(int, 0),
        help="one-run audit canaries: labels set by a coin between two wrong ones "
        "(attacks.canaries), audited on the final global model",
    )  # fmt: skip
    canary_clients: str = option(
        "spread", kind=Choice(CANARY_CLIENTS),
        help="where the canary examples are: spread (where the population dealt them) or "
        "first (all moved into client 0, which then holds each once)",
    )  # fmt: skip
    validation_size: int | None = option(
        None, kind=AT_LEAST_ONE, none="evaluate on the test split",
        help="tuning: carve this many examples from the training split (labeldp.data.hold_out"
        ", the same for every run), evaluate on them; the clients hold the rest",
    )  # fmt: skip
    model: str = option("cnn-tanh", kind=Text(), help="model name (no BatchNorm)")
    chunk_size: int = option(256, kind=AT_LEAST_ONE, help="trips trained per vectorized call")
    forward: str = option(
        "auto", kind=Choice(FORWARDS),
        help="stacked clients' forward: vmap, grouped (one model with grouped layers), a "
        "per-client loop, or auto (vmap on CUDA; on CPU the model's choice: grouped for "
        "cnn-tanh)",
    )  # fmt: skip
    eval_every: int = option(20, kind=AT_LEAST_ONE, help="server steps between evaluations")
    stop_at: float | None = option(
        None, kind=Number(float, 0, 1, low_open=True), none="run every server step",
        help="stop at the first evaluation with accuracy ≥ this (time-to-target studies)",
    )  # fmt: skip
    checkpoint_every: int = option(100, kind=AT_LEAST_ONE, help="server steps between checkpoints")

    def validate(self) -> None:
        if self.label_privacy != "none" and self.epsilon is None:
            raise_config(f"label_privacy {self.label_privacy} needs epsilon")
        if self.label_privacy == "none" and self.epsilon is not None:
            raise_config("epsilon needs label_privacy (rr, rr-prior or alibi)")
        self.config(0)  # the simulator's own checks, with the presets filled

    @property
    def mode(self) -> str:
        return "sync" if self.algorithm in ("fedavg", "fedavgm") else "async"

    def config(self, seed: int) -> FederatedConfig:
        """The simulator's configuration, presets filled (module docstring)."""
        sync = self.mode == "sync"
        if self.buffer_size is not None:
            k = self.buffer_size
        else:
            k = 1 if self.algorithm == "fedasync" else (self.concurrency if sync else 10)
        momentum = self.server_momentum
        if momentum is None:
            momentum = 0.9 if self.algorithm == "fedavgm" else 0.0
        return FederatedConfig(
            algorithm=self.algorithm,
            schedule=ScheduleConfig(
                mode=self.mode, concurrency=self.concurrency,
                buffer_size=min(k, self.concurrency) if sync else k,
                server_steps=self.server_steps, time_budget=self.time_budget,
                durations=Durations(
                    kind=self.durations, mean=self.duration_mean, spread=self.duration_spread,
                    speed_sigma=self.speed_sigma, scale_by_size=self.scale_by_size,
                ),
                arrival_rate=self.arrival_rate, over_selection=self.over_selection,
                timeout=self.timeout, participation_cap=self.participation_cap,
            ),
            local=LocalTraining(
                lr=self.local_lr, batch_size=self.local_batch, epochs=self.local_epochs,
                steps=self.local_steps, momentum=self.local_momentum,
            ),
            server=ServerOptimizer(lr=self.server_lr, momentum=momentum),
            staleness=StalenessWeight(
                kind=self.staleness, exponent=self.staleness_exponent, limit=self.staleness_limit
            ),
            label_privacy=self.label_privacy, epsilon=self.epsilon, clip=self.clip,
            noise_multiplier=self.noise_multiplier, delta=self.delta, model=self.model,
            chunk_size=self.chunk_size, forward=self.forward, eval_every=self.eval_every,
            checkpoint_every=self.checkpoint_every, stop_at=self.stop_at, seed=seed,
        )  # fmt: skip


def raise_config(message: str) -> None:
    from ..errors import ConfigError

    raise ConfigError(message)


def build_population(
    options: FederationOptions,
    labels: np.ndarray,
    seed: int,
    canaries: np.ndarray | None = None,
) -> Population:
    """The clients of ``options`` over a dataset with ``labels`` (int, (N,)); ``seed`` is
    the population's own (labeldp derives it from the run seed and Stream.FL_POPULATION).
    ``canaries``: the canary examples' indices, moved into client 0 when
    ``canary_clients`` is "first" (:func:`gather`); with "spread" they stay where the
    layout put them.

    With canaries, ``labels`` are the TRUE labels, read before any is replaced (labeldp.fl
    .run): the layout is the federation's given, and a canary then differs from its
    neighbouring dataset in its label only, not in which client holds it. A layout read
    from the planted labels (shards, dirichlet) would deal a canary by its planted label
    (for an audit canary, by its coin), a dependence on the label outside the clients'
    label mechanism that its ε does not cover."""
    population = _layout(options, labels, seed)
    if canaries is not None and len(canaries) and options.canary_clients == "first":
        population = gather(population, canaries, 0)
    return population


def gather(population: Population, examples: np.ndarray, client: int) -> Population:
    """``population`` with ``examples`` (indices) taken from every client that holds them
    (replicas included) and given to ``client``, which holds each once. The examples are
    the canaries, chosen without looking at labels, so the new layout does not depend on
    labels beyond the original one. A client left with no example is a ConfigError."""
    examples = np.unique(np.asarray(examples, dtype=np.int64))
    ids = np.repeat(np.arange(population.num_clients), population.sizes)
    moved = np.isin(population.indices, examples)
    ids = np.concatenate([ids[~moved], np.full(len(examples), client)])
    held = np.concatenate([population.indices[~moved], examples])
    counts = np.bincount(ids, minlength=population.num_clients)
    empty = np.flatnonzero(counts == 0)
    if empty.size:
        raise_config(
            f"canary_clients 'first': moving the {len(examples)} canaries into client "
            f"{client} leaves client {empty[0]} with no example; use fewer canaries, fewer "
            "clients or canary_clients 'spread'"
        )
    order = np.lexsort((held, ids))
    return Population(
        np.concatenate([[0], np.cumsum(counts)]), held[order], population.num_examples,
        f"{population.layout}; {len(examples)} canaries in client {client}",
        population.looks_at_labels,
    )  # fmt: skip


def _layout(options: FederationOptions, labels: np.ndarray, seed: int) -> Population:
    n = len(labels)
    if options.layout == "shards":
        return shards(labels, options.clients, seed)
    if options.layout == "dirichlet":
        return dirichlet(labels, options.clients, options.alpha, seed,
                         min_size=options.min_size, total=options.held)  # fmt: skip
    total = options.held or n
    sizes = None
    if options.sizes != "equal" or options.held is not None:
        sizes = client_sizes(options.sizes, options.clients, total, seed,
                             min_size=options.min_size, sigma=options.size_sigma)  # fmt: skip
    return iid(n, options.clients, seed, sizes=sizes)


def options_markdown() -> str:
    """docs/FL_OPTIONS.md: every federation option, its flag, values and default."""
    table = _markdown([("labeldp fl", FederationOptions)]).split("## labeldp fl\n", 1)[1]
    intro = [
        "# Federation options",
        "",
        "Generated from the declarations in `labeldp/fl/options.py` by "
        "`python -m labeldp.fl.options` (a test keeps this file equal to it). Each option "
        "is a `labeldp fl` flag and a key of a federated sweep file's `[options]`, `[grid]` "
        "and `[when.<algorithm>]` tables (see `labeldp/fl/study.py`).",
        "",
    ]
    return "\n".join(intro) + table


if __name__ == "__main__":  # python -m labeldp.fl.options > docs/FL_OPTIONS.md
    print(options_markdown(), end="")
