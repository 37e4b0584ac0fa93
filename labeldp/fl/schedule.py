"""Phase A of a federated simulation: who trains when, from timing randomness alone.

An event-driven simulation on a virtual clock (a heap ordered by (time, sequence number))
of client trips: a trip downloads the server's model at version v (the number of server
updates so far) at its dispatch time, trains for a duration (:class:`~labeldp.fl.durations.
Durations`) and uploads at its arrival time. Nothing here looks at model values, so the
whole schedule — every trip's client, dispatch time and version, arrival time, the flush
it lands in and its staleness — is computed first; training then replays it version by
version (:mod:`labeldp.fl.simulator`), which makes the results independent of how the
training is batched, chunked or distributed.

Two ways of running a federation, one output (:class:`Schedule`):

- "async" (FedBuff; FedAsync is buffer_size = 1): the server keeps ``concurrency`` C
  clients training (or, with ``arrival_rate``, clients start at Poisson times, no cap).
  Every arrival goes into the buffer; the K-th arrival flushes it: one server update,
  version t → t + 1. An arrival triggers the next dispatch after any flush, so the new
  client downloads the newest model. Staleness τ = (flush index) − (version downloaded):
  the number of server updates between the client's download and the update its
  contribution enters, measured from the DOWNLOAD (not from the upload).
- "sync" (FedAvg / FedAvgM): round r dispatches a cohort of ceil(M(1 + over_selection))
  clients at version r at once; the round closes at the M-th arrival (or at ``timeout``
  after its start, with whoever arrived); later trips are dropped (wasted trips, counted)
  and the next round starts at the close. Every aggregated trip has staleness 0.

Client selection is uniform over the eligible clients: not training, not waiting in the
unflushed buffer (so a client is never twice in one flush, which user-level DP needs),
and under the participation cap (user-level DP's m). When none is eligible the
simulation ends early (``Schedule.stopped_early``).

Trips still training or waiting in the buffer when the last of ``server_steps`` flushes
happens are never aggregated (flush = −1, like dropped ones).

All times are virtual (the durations' unit). Randomness: one numpy generator seeded by the
caller (labeldp derives it from the run seed and ``Stream.FL_SCHEDULE``).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field

import numpy as np

from ..errors import ConfigError, check_int
from .durations import Durations

MODES = ("async", "sync")
_BLOCK = 1 << 14  # random numbers drawn per block


@dataclass(frozen=True)
class ScheduleConfig:
    """How a federation runs in time.

    mode: "async" or "sync" (module docstring). concurrency: async, the number of clients
    training at once (C ≥ 1); sync, the cohort M aggregated per round. buffer_size: async,
    the K arrivals per server update (1 = FedAsync; ignored by sync, whose K is M).
    arrival_rate: async only, clients start at Poisson times with this rate (per unit
    time) instead of keeping C busy. over_selection: sync, extra clients dispatched as a
    fraction of M (≥ 0). timeout: sync, a round closes this long after its start at the
    latest (> 0). durations: the trip-duration distribution. participation_cap: the most
    trips a client may make (None: no cap). server_steps: server updates to simulate (≥ 1).
    time_budget: also stop at the first server update at or after this virtual time (> 0;
    None: server_steps alone), so that algorithms can be compared over equal time.
    """

    def done(self, flush_times: list[float]) -> bool:
        """Whether the simulation has made all its server updates."""
        if len(flush_times) >= self.server_steps:
            return True
        return (
            bool(flush_times)
            and self.time_budget is not None
            and flush_times[-1] >= self.time_budget
        )

    mode: str = "async"
    concurrency: int = 100
    buffer_size: int = 10
    server_steps: int = 100
    durations: Durations = field(default_factory=Durations)
    arrival_rate: float | None = None
    over_selection: float = 0.0
    timeout: float | None = None
    participation_cap: int | None = None
    time_budget: float | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        check_int("concurrency", self.concurrency, 1)
        check_int("buffer_size", self.buffer_size, 1)
        check_int("server_steps", self.server_steps, 1)
        if not isinstance(self.durations, Durations):
            raise ConfigError(f"durations must be a Durations, got {type(self.durations).__name__}")
        if self.arrival_rate is not None:
            if self.mode != "async":
                raise ConfigError("arrival_rate (Poisson arrivals) applies to mode 'async' only")
            if not (math.isfinite(self.arrival_rate) and self.arrival_rate > 0):
                raise ConfigError(
                    f"arrival_rate must be a finite number > 0, got {self.arrival_rate!r}"
                )
        if not (math.isfinite(self.over_selection) and self.over_selection >= 0):
            raise ConfigError(
                f"over_selection must be a finite number ≥ 0, got {self.over_selection!r}"
            )
        if self.over_selection and self.mode != "sync":
            raise ConfigError("over_selection applies to mode 'sync' only")
        if self.timeout is not None:
            if self.mode != "sync":
                raise ConfigError("timeout applies to mode 'sync' only")
            if not (math.isfinite(self.timeout) and self.timeout > 0):
                raise ConfigError(f"timeout must be a finite number > 0, got {self.timeout!r}")
        if self.participation_cap is not None:
            check_int("participation_cap", self.participation_cap, 1)
        if self.time_budget is not None and not (
            math.isfinite(self.time_budget) and self.time_budget > 0
        ):
            raise ConfigError(f"time_budget must be a finite number > 0, got {self.time_budget!r}")
        if (
            self.mode == "async"
            and self.arrival_rate is None
            and self.buffer_size > self.concurrency
        ):
            raise ConfigError(
                f"buffer_size ({self.buffer_size}) must be ≤ concurrency ({self.concurrency}): "
                "a client is never twice in one flush, so K distinct clients must be able to "
                "arrive before it"
            )

    @property
    def aggregation_size(self) -> int:
        """K: contributions per server update (sync: the cohort M)."""
        return self.concurrency if self.mode == "sync" else self.buffer_size


@dataclass(frozen=True)
class Schedule:
    """Every trip of a simulated federation, in dispatch order (arrays of equal length).

    client: the client (0 ≤ c < num_clients). dispatch_time, arrival_time: virtual times
    (arrival > dispatch). version: the server version downloaded at dispatch. flush: the
    server update the contribution enters (0-based; the update from version f to f + 1),
    −1 when never aggregated (dropped by a sync round, or still out at the end). staleness:
    flush − version for aggregated trips, −1 otherwise. flush_time: the virtual time of
    each server update; flush_count: its number of contributions (K, or fewer for a sync
    round closed by its timeout).
    """

    client: np.ndarray
    dispatch_time: np.ndarray
    arrival_time: np.ndarray
    version: np.ndarray
    flush: np.ndarray
    staleness: np.ndarray
    flush_time: np.ndarray
    flush_count: np.ndarray
    num_clients: int
    stopped_early: bool = False

    @property
    def participation(self) -> np.ndarray:
        """Each trip's number among its client's trips (0 for its first), in dispatch
        order: a trip's randomness is keyed by (client, participation), so a client's
        k-th trip draws the same batches under every algorithm."""
        order = np.lexsort((np.arange(len(self.client)), self.client))
        counts = np.bincount(self.client, minlength=self.num_clients)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        ranks = np.empty(len(self.client), dtype=np.int64)
        ranks[order] = np.arange(len(self.client)) - np.repeat(starts, counts)
        return ranks

    def __len__(self) -> int:
        return len(self.client)

    @property
    def server_steps(self) -> int:
        return len(self.flush_time)

    @property
    def aggregated(self) -> np.ndarray:
        """Mask of the trips that enter a server update."""
        return self.flush >= 0

    def until(self, steps: int) -> Schedule:
        """The schedule of the first ``steps`` server updates only (1 ≤ steps ≤
        server_steps), as a simulation stopped there would have it: trips that downloaded a
        later version are gone, contributions to a later update are still out (flush and
        staleness −1); ``stopped_early`` when steps < server_steps. (Equal to simulating
        ``steps`` updates: tested.)"""
        check_int("steps", steps, 1)
        if steps > self.server_steps:
            raise ConfigError(f"steps must be in 1..{self.server_steps}, got {steps}")
        if steps == self.server_steps:
            return self
        keep = self.version < steps
        late = self.flush[keep] >= steps
        return Schedule(
            client=self.client[keep],
            dispatch_time=self.dispatch_time[keep],
            arrival_time=self.arrival_time[keep],
            version=self.version[keep],
            flush=np.where(late, -1, self.flush[keep]),
            staleness=np.where(late, -1, self.staleness[keep]),
            flush_time=self.flush_time[:steps],
            flush_count=self.flush_count[:steps],
            num_clients=self.num_clients,
            stopped_early=True,
        )

    def trips_at_version(self, version: int) -> np.ndarray:
        """Indices of the aggregated trips that downloaded ``version`` (they all start from
        the same weights, so they train together)."""
        return np.flatnonzero((self.version == version) & self.aggregated)

    def trips_in_flush(self, flush: int) -> np.ndarray:
        return np.flatnonzero(self.flush == flush)

    def trips_arrived_by(self, time: float) -> int:
        """Client trips completed (uploaded) by virtual ``time``: the communication axis."""
        return int(np.count_nonzero(self.arrival_time <= time))

    def mean_concurrency(self) -> float:
        """Achieved concurrency: clients training at once, averaged over the simulated time."""
        end = float(self.flush_time[-1]) if self.server_steps else 0.0
        if end <= 0:
            return 0.0
        busy = np.clip(np.minimum(self.arrival_time, end) - self.dispatch_time, 0.0, None)
        return float(busy.sum() / end)

    def staleness_summary(self) -> dict[str, float]:
        """Mean, median and 99th percentile of the aggregated trips' staleness."""
        tau = self.staleness[self.aggregated]
        if len(tau) == 0:
            return {"mean": math.nan, "p50": math.nan, "p99": math.nan}
        return {
            "mean": float(tau.mean()),
            "p50": float(np.percentile(tau, 50)),
            "p99": float(np.percentile(tau, 99)),
        }


class _Draws:
    """Blocks of random numbers, so the event loop draws without a numpy call per event."""

    def __init__(self, rng: np.random.Generator, durations: Durations, num_clients: int) -> None:
        self.rng, self.durations, self.num_clients = rng, durations, num_clients
        self._dur: list[float] = []
        self._cli: list[int] = []
        self._gap: list[float] = []

    def duration(self) -> float:
        if not self._dur:
            self._dur = self.durations.draw(self.rng, _BLOCK).tolist()[::-1]
        return self._dur.pop()

    def client(self) -> int:
        if not self._cli:
            self._cli = self.rng.integers(0, self.num_clients, _BLOCK).tolist()[::-1]
        return self._cli.pop()

    def gap(self, rate: float) -> float:
        if not self._gap:
            self._gap = self.rng.exponential(1.0, _BLOCK).tolist()[::-1]
        return self._gap.pop() / rate


class _Eligibility:
    """Which clients may be dispatched: not busy (training or in the buffer), under the cap.

    Python lists, not numpy arrays: the event loop reads one entry at a time, which a list
    does several times faster."""

    def __init__(self, num_clients: int, cap: int | None, draws: _Draws) -> None:
        self.busy = bytearray(num_clients)
        self.trips = [0] * num_clients
        self.cap = cap if cap is not None else math.inf
        self.draws = draws
        self.unavailable = 0  # busy or capped
        self.scan_below = num_clients * 0.1  # fewer available than this: scan, don't guess

    def pick(self) -> int | None:
        """A uniformly random eligible client (rejection sampling; an exact scan when few
        clients are available), or None when there is none."""
        busy, trips, cap, draw = self.busy, self.trips, self.cap, self.draws.client
        if len(busy) - self.unavailable > self.scan_below:
            for _ in range(64):
                c = draw()
                if not busy[c] and trips[c] < cap:
                    return c
        choices = [c for c in range(len(busy)) if not busy[c] and trips[c] < cap]
        if not choices:
            return None
        return choices[int(self.draws.rng.integers(len(choices)))]

    def take(self, c: int) -> None:
        self.busy[c] = 1
        self.trips[c] += 1
        self.unavailable += 1

    def release(self, c: int) -> None:
        self.busy[c] = 0
        if self.trips[c] < self.cap:
            self.unavailable -= 1


def simulate_schedule(
    config: ScheduleConfig,
    num_clients: int,
    rng: np.random.Generator,
    client_sizes: np.ndarray | None = None,
) -> Schedule:
    """The schedule of ``config.server_steps`` server updates over ``num_clients`` clients.

    client_sizes: examples per client (for ``Durations.scale_by_size``; default all 1).
    rng: the timing and selection randomness (nothing else is drawn from it).
    """
    check_int("num_clients", num_clients, 1)
    if config.mode == "sync" and num_clients < config.concurrency:
        raise ConfigError(
            f"a sync cohort of {config.concurrency} needs at least that many clients, "
            f"got num_clients={num_clients}"
        )
    sizes = np.ones(num_clients) if client_sizes is None else np.asarray(client_sizes)
    if len(sizes) != num_clients:
        raise ConfigError(f"client_sizes has {len(sizes)} entries for {num_clients} clients")
    factors = config.durations.client_factors(rng, sizes)
    draws = _Draws(rng, config.durations, num_clients)
    if config.mode == "sync":
        return _simulate_sync(config, num_clients, factors, draws)
    return _simulate_async(config, num_clients, factors, draws)


def _simulate_async(config, num_clients, factors, draws) -> Schedule:
    K = config.buffer_size
    eligible = _Eligibility(num_clients, config.participation_cap, draws)
    client: list[int] = []
    dispatch_time: list[float] = []
    arrival_time: list[float] = []
    version_of: list[int] = []
    flush_of: list[int] = []
    flush_time: list[float] = []
    heap: list[tuple[float, int, int]] = []  # (time, sequence, trip or −1 for a start)
    buffer: list[int] = []
    version = 0
    stopped = False

    def dispatch(now: float) -> bool:
        c = eligible.pick()
        if c is None:
            return False
        eligible.take(c)
        d = draws.duration()
        if factors is not None:
            d *= factors[c]
        trip = len(client)
        client.append(c)
        dispatch_time.append(now)
        arrival_time.append(now + d)
        version_of.append(version)
        flush_of.append(-1)
        heapq.heappush(heap, (now + d, trip, trip))
        return True

    sequence = -1  # start events sort before arrivals at the same time (never equal trips)
    if config.arrival_rate is None:
        for _ in range(config.concurrency):
            if not dispatch(0.0):
                raise ConfigError(
                    f"concurrency {config.concurrency} exceeds the {num_clients} clients"
                )
    else:
        heapq.heappush(heap, (draws.gap(config.arrival_rate), sequence, -1))
    while not config.done(flush_time):
        if not heap:
            stopped = True
            break
        now, _, trip = heapq.heappop(heap)
        if trip < 0:  # a Poisson start
            dispatch(now)
            sequence -= 1
            heapq.heappush(heap, (now + draws.gap(config.arrival_rate), sequence, -1))
            continue
        buffer.append(trip)
        flush_of[trip] = version  # provisional: the flush now being filled
        if len(buffer) == K:
            flush_time.append(now)
            for t in buffer:
                eligible.release(client[t])
            buffer.clear()
            version += 1
        if config.arrival_rate is None and not config.done(flush_time):
            # refill to C (after a flush, clients that waited in the buffer are free again)
            while len(heap) < config.concurrency and dispatch(now):
                pass
    for t in buffer:  # in the buffer at the end: never aggregated
        flush_of[t] = -1
    return _finish(
        client,
        dispatch_time,
        arrival_time,
        version_of,
        flush_of,
        flush_time,
        K,
        num_clients,
        stopped,
    )


def _simulate_sync(config, num_clients, factors, draws) -> Schedule:
    M = config.concurrency
    size = min(num_clients, math.ceil(M * (1 + config.over_selection)))
    eligible = _Eligibility(num_clients, config.participation_cap, draws)
    client: list[int] = []
    dispatch_time: list[float] = []
    arrival_time: list[float] = []
    version_of: list[int] = []
    flush_of: list[int] = []
    flush_time: list[float] = []
    counts: list[int] = []
    now = 0.0
    stopped = False
    for round_ in range(config.server_steps):
        if config.done(flush_time):
            break
        cohort: list[int] = []
        for _ in range(size):
            c = eligible.pick()
            if c is None:
                break
            eligible.take(c)
            cohort.append(c)
        if not cohort:
            stopped = True
            break
        durations = np.array([draws.duration() for _ in cohort])
        if factors is not None:
            durations = durations * factors[cohort]
        order = np.argsort(durations, kind="stable")
        rank = np.empty(len(cohort), dtype=np.int64)
        rank[order] = np.arange(len(cohort))
        close_at = float(durations[order[min(M, len(cohort)) - 1]])
        if config.timeout is not None:
            close_at = min(close_at, config.timeout)
        in_round = (rank < M) & (durations <= close_at)
        for i, c in enumerate(cohort):  # dispatch order = selection order
            client.append(c)
            dispatch_time.append(now)
            arrival_time.append(now + float(durations[i]))
            version_of.append(round_)
            flush_of.append(round_ if in_round[i] else -1)
        for c in cohort:
            eligible.release(c)
        now += close_at
        flush_time.append(now)
        counts.append(int(in_round.sum()))
    schedule = _finish(
        client,
        dispatch_time,
        arrival_time,
        version_of,
        flush_of,
        flush_time,
        M,
        num_clients,
        stopped,
    )
    return Schedule(**{**schedule.__dict__, "flush_count": np.asarray(counts, dtype=np.int64)})


def _finish(
    client, dispatch_time, arrival_time, version_of, flush_of, flush_time, K, num_clients, stopped
) -> Schedule:
    version = np.asarray(version_of, dtype=np.int64)
    flush = np.asarray(flush_of, dtype=np.int64)
    staleness = np.where(flush >= 0, flush - version, -1)
    flush_count = np.bincount(flush[flush >= 0], minlength=len(flush_time)).astype(np.int64)
    return Schedule(
        client=np.asarray(client, dtype=np.int64),
        dispatch_time=np.asarray(dispatch_time, dtype=np.float64),
        arrival_time=np.asarray(arrival_time, dtype=np.float64),
        version=version,
        flush=flush,
        staleness=staleness,
        flush_time=np.asarray(flush_time, dtype=np.float64),
        flush_count=flush_count[: len(flush_time)],
        num_clients=num_clients,
        stopped_early=stopped,
    )
