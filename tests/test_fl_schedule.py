"""The federated schedule (phase A): timing, selection, staleness, each checked against a
recomputation from the schedule's own times."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from labeldp.errors import ConfigError
from labeldp.fl.durations import KINDS, Durations
from labeldp.fl.schedule import ScheduleConfig, simulate_schedule


def schedule(num_clients=200, seed=0, **kw):
    return simulate_schedule(ScheduleConfig(**kw), num_clients, np.random.default_rng(seed))


@pytest.mark.parametrize("kind", KINDS)
def test_durations_positive_with_the_stated_mean(kind):
    d = Durations(kind=kind, mean=2.0, spread=0.5)
    x = d.draw(np.random.default_rng(0), 200_000)
    assert (x > 0).all() and (x >= d.floor).all()
    assert abs(x.mean() - 2.0) < 0.03


def test_durations_that_could_reach_zero_are_refused():
    for bad in (
        dict(kind="uniform", spread=1.0),
        dict(mean=0.0),
        dict(minimum=0.0),
        dict(kind="lognormal", spread=0.0),
        dict(kind="gamma"),
    ):
        with pytest.raises(ConfigError):
            Durations(**bad)


def test_staleness_is_measured_at_download():
    s = schedule(concurrency=20, buffer_size=3, server_steps=300)
    # the version a trip downloaded = the flushes that happened before its dispatch
    # (a dispatch at the time of a flush follows it: the arrival that flushed dispatches)
    downloaded = np.searchsorted(s.flush_time, s.dispatch_time, side="right")
    assert (downloaded == s.version).all()
    agg = s.aggregated
    # the flush a trip enters = the flushes before its arrival
    entered = np.searchsorted(s.flush_time, s.arrival_time[agg], side="left")
    assert (entered == s.flush[agg]).all()
    assert (s.staleness[agg] == s.flush[agg] - s.version[agg]).all()
    assert (s.staleness[agg] >= 0).all()


@pytest.mark.parametrize(("C", "K"), [(20, 1), (60, 6), (100, 10)])
def test_mean_staleness_is_about_concurrency_over_buffer(C, K):
    s = schedule(num_clients=2000, concurrency=C, buffer_size=K, server_steps=3000)
    steady = s.aggregated & (s.version > 10 * C // K)
    mean = s.staleness[steady].mean()
    assert abs(mean - C / K) < 0.1 * C / K + 0.2, mean
    assert abs(s.mean_concurrency() - C) < 0.02 * C


def test_a_client_is_never_twice_in_one_flush_and_the_cap_holds():
    s = schedule(
        num_clients=30, concurrency=20, buffer_size=10, server_steps=200, participation_cap=50
    )
    for f in range(s.server_steps):
        clients = s.client[s.flush == f]
        assert len(clients) == 10 and len(np.unique(clients)) == 10
    assert np.bincount(s.client).max() <= 50


def test_the_cap_ends_a_federation_early():
    s = schedule(
        num_clients=10, concurrency=5, buffer_size=5, server_steps=100, participation_cap=2
    )
    # 20 trips at most; a client waiting in the buffer cannot take the last one
    assert s.stopped_early and s.server_steps in (3, 4)
    assert np.bincount(s.client).max() <= 2


def test_schedule_is_deterministic_from_the_seed():
    a, b = schedule(seed=3, server_steps=50), schedule(seed=3, server_steps=50)
    c = schedule(seed=4, server_steps=50)
    assert all(
        np.array_equal(getattr(a, k), getattr(b, k)) for k in ("client", "arrival_time", "flush")
    )
    assert not np.array_equal(a.client, c.client)


def test_sync_rounds_aggregate_the_first_m_and_drop_the_rest():
    s = schedule(mode="sync", concurrency=10, over_selection=0.5, server_steps=20)
    assert (s.flush_count == 10).all()
    assert (s.staleness[s.aggregated] == 0).all()
    assert (~s.aggregated).sum() == 20 * 5
    for r in range(20):
        trips = s.version == r
        kept = s.arrival_time[trips & s.aggregated]
        lost = s.arrival_time[trips & ~s.aggregated]
        assert kept.max() <= lost.min()  # the M fastest are kept
        assert np.isclose(s.flush_time[r], kept.max())  # the round closes at the M-th


def test_sync_timeout_closes_rounds_early():
    s = schedule(
        mode="sync",
        concurrency=10,
        timeout=0.5,
        server_steps=30,
        durations=Durations("exponential", mean=1.0),
    )
    assert (np.diff(np.concatenate([[0], s.flush_time])) <= 0.5 + 1e-12).all()
    assert (s.flush_count < 10).any()


def test_poisson_arrivals_have_the_stated_rate():
    s = schedule(num_clients=5000, arrival_rate=20.0, buffer_size=10, server_steps=500)
    gaps = np.diff(np.sort(s.dispatch_time))
    assert abs(gaps.mean() - 1 / 20) < 0.05 / 20


def test_bad_schedules_are_refused():
    for bad in (
        dict(buffer_size=20, concurrency=10),
        dict(mode="sync", over_selection=-1),
        dict(mode="async", timeout=1.0),
        dict(mode="sync", arrival_rate=1.0),
        dict(concurrency=0),
        dict(mode="fedbuff"),
    ):
        with pytest.raises(ConfigError):
            ScheduleConfig(**bad)
    with pytest.raises(ConfigError, match="exceeds"):
        schedule(num_clients=5, concurrency=10, buffer_size=1)


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_a_time_budget_stops_at_the_first_update_after_it(mode):
    s = schedule(mode=mode, concurrency=10, buffer_size=5, server_steps=10_000, time_budget=20.0)
    assert s.flush_time[-1] >= 20.0 and (s.flush_time[:-1] < 20.0).all()
    with pytest.raises(ConfigError, match="time_budget"):
        ScheduleConfig(time_budget=0.0)


@pytest.mark.parametrize(
    "kw",
    [
        {"mode": "async", "concurrency": 20, "buffer_size": 5},
        {"mode": "async", "concurrency": 20, "buffer_size": 3, "arrival_rate": 15.0},
        {"mode": "sync", "concurrency": 10, "over_selection": 0.3},
        {"mode": "sync", "concurrency": 10, "timeout": 1.5},
    ],
)
def test_a_schedule_cut_after_some_steps_is_the_shorter_simulation(kw):
    short = simulate_schedule(ScheduleConfig(server_steps=30, **kw), 200, np.random.default_rng(1))
    cut = simulate_schedule(
        ScheduleConfig(server_steps=70, **kw), 200, np.random.default_rng(1)
    ).until(30)
    for f in dataclasses.fields(short):
        if f.name != "stopped_early":
            assert np.array_equal(getattr(short, f.name), getattr(cut, f.name)), f.name
    assert cut.stopped_early and not short.stopped_early
    with pytest.raises(ConfigError, match="steps must be in 1..30"):
        short.until(31)
