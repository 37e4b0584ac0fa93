"""The federated simulator (phase B) against independent computations: the per-client
loop, FedAvg, centralized SGD, an uninterrupted run, and the privacy bookkeeping."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from labeldp.augment import Normalize
from labeldp.data.dataset import DeviceDataset
from labeldp.data.sources import get_info
from labeldp.errors import ConfigError
from labeldp.fl import simulator as sim
from labeldp.fl.clients import LocalTraining, flat_parameters, train_trips, train_trips_loop
from labeldp.fl.durations import Durations
from labeldp.fl.label_privacy import ClientLabels
from labeldp.fl.population import dirichlet, iid
from labeldp.fl.schedule import ScheduleConfig
from labeldp.fl.server import ServerOptimizer
from labeldp.mechanisms import RandomizedResponse, RRWithPrior
from labeldp.models import build_model
from labeldp.privacy import Neighbouring
from labeldp.train.targets import HardLabels

INFO = get_info("fashion-mnist")


def record_calls(monkeypatch, cls, name="privatize") -> list:
    """Wraps ``cls.name``; each call appends its positional arguments."""
    calls, original = [], getattr(cls, name)

    def recorded(self, *args, **kwargs):
        calls.append(args)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, name, recorded)
    return calls


def bars(n: int, seed: int) -> DeviceDataset:
    """Fashion-MNIST-shaped images a model learns quickly: class k is a bright bar."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=g)
    images = torch.randint(0, 60, (n, 1, 28, 28), generator=g, dtype=torch.uint8)
    for k in range(10):
        images[labels == k, :, 2 * k + 4 : 2 * k + 6, 2:26] = 250
    return DeviceDataset(images, labels, INFO)


TRAIN, TEST = bars(400, 0), bars(200, 1)


def config(**kw) -> sim.FederatedConfig:
    schedule = kw.pop("schedule", ScheduleConfig(concurrency=8, buffer_size=4, server_steps=6))
    kw.setdefault("local", LocalTraining(lr=0.05, batch_size=8, epochs=1))
    kw.setdefault("eval_every", 3)
    return sim.FederatedConfig(schedule=schedule, **kw)


@pytest.mark.parametrize("forward", ["vmap", "grouped"])
def test_vectorized_trips_equal_the_per_client_loop(forward):
    torch.manual_seed(0)
    model = build_model("cnn-tanh", num_classes=10, in_channels=1, image_size=28, norm="group")
    start = {k: v.detach().clone() for k, v in model.named_parameters()}
    sizes = [3, 17, 8, 25, 9, 1]  # ragged: 1 to 4 local steps at B = 8
    examples = [torch.randperm(400)[:s] for s in sizes]
    local = LocalTraining(lr=0.1, batch_size=8, epochs=1, momentum=0.9, weight_decay=1e-3)
    normalize = Normalize(INFO.mean, INFO.std)

    def gens():
        return [torch.Generator().manual_seed(i) for i in range(len(sizes))]

    args = (model, start, TRAIN.images, HardLabels(TRAIN.labels), examples)
    batched = train_trips(*args, gens(), local, normalize, forward=forward)
    looped = train_trips_loop(*args, gens(), local, normalize)
    assert batched.abs().max() > 1e-3
    torch.testing.assert_close(batched, looped, atol=2e-6, rtol=1e-4)
    # a trip trains the same whichever trips it is batched with
    alone = train_trips(model, start, TRAIN.images, HardLabels(TRAIN.labels), examples[3:4],
                        gens()[3:4], local, normalize, forward=forward)  # fmt: skip
    torch.testing.assert_close(alone[0], batched[3], atol=2e-6, rtol=1e-4)


def test_fedbuff_with_k_equal_to_the_cohort_is_fedavg():
    # every client busy, so each flush holds the M trips dispatched at one version
    population = iid(400, 8, seed=0)
    steps, m = 4, 8
    fedbuff = config(schedule=ScheduleConfig(concurrency=m, buffer_size=m, server_steps=steps))
    fedavg = config(
        algorithm="fedavg", schedule=ScheduleConfig(mode="sync", concurrency=m, server_steps=steps)
    )
    a = sim.run_federation(fedbuff, TRAIN, TEST, population, progress=False)
    b = sim.run_federation(fedavg, TRAIN, TEST, population, progress=False)
    assert (
        a.schedule.version[a.schedule.aggregated] == a.schedule.flush[a.schedule.aggregated]
    ).all()
    assert torch.equal(a.parameters, b.parameters)
    assert a.history[-1]["accuracy"] == b.history[-1]["accuracy"]


def test_fedasync_with_one_client_one_step_is_sgd():
    population = iid(400, 1, seed=0)
    steps, lr = 5, 0.1
    cfg = config(
        algorithm="fedasync",
        schedule=ScheduleConfig(concurrency=1, buffer_size=1, server_steps=steps),
        local=LocalTraining(lr=lr, batch_size=16, steps=1),
    )
    result = sim.run_federation(cfg, TRAIN, TEST, population, progress=False)
    # centralized SGD on the same batches: the client's (0, t) stream, its first 16 of a
    # permutation of its examples
    torch.manual_seed(sim.derive_seed(0, sim.Stream.MODEL_INIT))
    model = build_model("cnn-tanh", num_classes=10, in_channels=1, image_size=28, norm="group")
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    normalize = Normalize(INFO.mean, INFO.std)
    own = torch.tensor(population.client(0))
    for t in range(steps):
        g = torch.Generator().manual_seed(sim.derive_seed(0, sim.Stream.FL_TRIP, 0, t))
        idx = own[torch.randperm(len(own), generator=g)[:16]]
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(
            model(normalize(TRAIN.images[idx])), TRAIN.labels[idx]
        )
        loss.backward()
        opt.step()
    expected = flat_parameters(dict(model.named_parameters()))
    torch.testing.assert_close(result.parameters, expected, atol=1e-6, rtol=1e-5)


def test_updates_are_divided_by_k_with_their_staleness_weights():
    """No per-version averaging: the flush is Σ s(τ)·Δ / K over whatever versions."""
    population = iid(400, 20, seed=1)
    cfg = config(schedule=ScheduleConfig(concurrency=6, buffer_size=3, server_steps=5))
    result = sim.run_federation(cfg, TRAIN, TEST, population, progress=False)
    s = result.schedule
    assert (s.staleness[s.aggregated] > 0).any()  # some flush mixes versions
    # replay by hand with the public pieces
    torch.manual_seed(sim.derive_seed(0, sim.Stream.MODEL_INIT))
    model = build_model("cnn-tanh", num_classes=10, in_channels=1, image_size=28, norm="group")
    like = {k: v.detach() for k, v in model.named_parameters()}
    xs = [flat_parameters(like).double()]
    part = s.participation
    normalize = Normalize(INFO.mean, INFO.std)
    for f in range(s.server_steps):
        total = torch.zeros_like(xs[0])
        for t in np.flatnonzero(s.flush == f):
            start = sim.unflatten(xs[s.version[t]].float(), like)
            g = torch.Generator().manual_seed(
                sim.derive_seed(0, sim.Stream.FL_TRIP, int(s.client[t]), int(part[t]))
            )
            own = torch.tensor(population.client(int(s.client[t])))
            delta = train_trips_loop(model, start, TRAIN.images, HardLabels(TRAIN.labels), [own],
                                     [g], cfg.local, normalize)[0]  # fmt: skip
            total += (1 + s.staleness[t]) ** -0.5 * delta.double()
        xs.append(xs[-1] - total / 3)
    torch.testing.assert_close(result.parameters, xs[-1].float(), atol=1e-5, rtol=1e-4)


def test_chunking_does_not_change_the_result():
    population = iid(400, 30, seed=2)
    schedule = ScheduleConfig(concurrency=12, buffer_size=4, server_steps=4)
    a = sim.run_federation(config(schedule=schedule, chunk_size=1), TRAIN, TEST, population,
                           progress=False)  # fmt: skip
    b = sim.run_federation(config(schedule=schedule, chunk_size=64), TRAIN, TEST, population,
                           progress=False)  # fmt: skip
    torch.testing.assert_close(a.parameters, b.parameters, atol=1e-6, rtol=1e-5)


def test_resume_after_an_interruption_finishes_like_an_uninterrupted_run(tmp_path, monkeypatch):
    population = dirichlet(TRAIN.labels.numpy(), 20, alpha=0.5, seed=0, min_size=5)
    cfg = config(
        schedule=ScheduleConfig(concurrency=10, buffer_size=2, server_steps=8),
        checkpoint_every=3, label_privacy="rr-prior", epsilon=2.0,
    )  # fmt: skip
    whole = sim.run_federation(cfg, TRAIN, TEST, population, progress=False)
    path = tmp_path / "fl.pt"
    real, calls = sim.FixedPointBuffer.total, [0]

    def dying(self):
        calls[0] += 1
        if calls[0] == 5:  # during server step 5, after the checkpoint of step 3
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(sim.FixedPointBuffer, "total", dying)
    with pytest.raises(KeyboardInterrupt):
        sim.run_federation(cfg, TRAIN, TEST, population, path, progress=False)
    monkeypatch.setattr(sim.FixedPointBuffer, "total", real)
    resumed = sim.run_federation(cfg, TRAIN, TEST, population, path, progress=False)
    assert torch.equal(whole.parameters, resumed.parameters)
    assert whole.history == resumed.history
    other = config(schedule=cfg.schedule, checkpoint_every=3, seed=1)
    with pytest.raises(ConfigError, match="another federation"):
        sim.run_federation(other, TRAIN, TEST, population, path, progress=False)


def test_each_label_is_released_once_whatever_the_participations(monkeypatch):
    calls = record_calls(monkeypatch, RRWithPrior)
    population = iid(400, 10, seed=0)
    cfg = config(
        schedule=ScheduleConfig(concurrency=5, buffer_size=5, server_steps=8),
        label_privacy="rr-prior", epsilon=1.0,
    )  # fmt: skip
    result = sim.run_federation(cfg, TRAIN, TEST, population, progress=False)
    s = result.schedule
    assert np.bincount(s.client).max() > 1  # clients came back
    released = sum(len(args[0]) for args in calls)
    assert released == len(
        np.unique(np.concatenate([population.client(c) for c in np.unique(s.client)]))
    )
    ledger = result.label_ledger.to_dict()
    assert result.label_ledger.epsilon == 1.0
    assert ledger["relation"] == str(Neighbouring.REPLACE_ONE_LABEL)
    assert not result.user_ledger.is_private


def test_rr_labels_are_drawn_once_up_front(monkeypatch):
    calls = record_calls(monkeypatch, RandomizedResponse)
    cfg = config(label_privacy="rr", epsilon=2.0)
    result = sim.run_federation(cfg, TRAIN, TEST, iid(400, 20, seed=0), progress=False)
    assert len(calls) == 1 and result.label_ledger.epsilon == 2.0
    assert math.isinf(result.history[-1]["user_epsilon"])


def test_user_level_dp_is_its_own_relation():
    cfg = config(
        schedule=ScheduleConfig(concurrency=8, buffer_size=4, server_steps=4, participation_cap=3),
        clip=0.5, noise_multiplier=1.0, label_privacy="rr", epsilon=4.0,
    )  # fmt: skip
    result = sim.run_federation(cfg, TRAIN, TEST, iid(400, 40, seed=0), progress=False)
    assert result.user_ledger.to_dict()["relation"] == str(Neighbouring.ONE_USER)
    assert result.label_ledger.epsilon == 4.0
    last = result.history[-1]
    assert 0 < last["user_epsilon"] < math.inf and last["user_delta"] == cfg.delta


def test_a_federation_learns():
    cfg = config(
        schedule=ScheduleConfig(concurrency=10, buffer_size=5, server_steps=30),
        local=LocalTraining(lr=0.1, batch_size=8, epochs=1), eval_every=30,
    )  # fmt: skip
    result = sim.run_federation(cfg, TRAIN, TEST, iid(400, 40, seed=0), progress=False)
    assert result.history[-1]["accuracy"] > 0.5
    assert result.overflows == 0


def test_algorithm_presets_are_checked():
    for bad in (
        dict(algorithm="fedavg"),  # async schedule
        dict(algorithm="fedasync"),  # K = 4
        dict(algorithm="fedavgm", schedule=ScheduleConfig(mode="sync", concurrency=4)),
        dict(noise_multiplier=1.0, clip=1.0),  # no participation cap
        dict(noise_multiplier=1.0),  # no clip
        dict(norm="batch"),
        dict(algorithm="fedsgd"),
    ):
        with pytest.raises(ConfigError):
            config(**bad)
    with pytest.raises(ConfigError):
        ServerOptimizer(lr=0)
    with pytest.raises(ConfigError):
        Durations(kind="uniform", spread=1.0)
    with pytest.raises(ConfigError):
        ClientLabels("rr", None, TRAIN.labels, 10)


def test_stop_at_ends_at_the_first_evaluation_reaching_it_as_a_shorter_run_would(tmp_path):
    population = iid(400, 20, seed=0)
    steps = ScheduleConfig(concurrency=8, buffer_size=4, server_steps=30)
    full = sim.run_federation(config(schedule=steps, eval_every=2), TRAIN, TEST, population,
                              progress=False)  # fmt: skip
    accuracies = [h["accuracy"] for h in full.history]
    target = sorted(accuracies)[len(accuracies) // 2]  # reached part-way, not at once
    first = next(i for i, a in enumerate(accuracies) if a >= target)
    assert 0 < first < len(accuracies) - 1
    cfg = config(schedule=steps, eval_every=2, stop_at=target, checkpoint_every=100)
    path = tmp_path / "fl.pt"
    stopped = sim.run_federation(cfg, TRAIN, TEST, population, path, progress=False)
    assert stopped.history == full.history[: first + 1]
    done = stopped.history[-1]["server_steps"]
    shorter = sim.run_federation(
        config(schedule=dataclasses.replace(steps, server_steps=done), eval_every=2),
        TRAIN, TEST, population, progress=False,
    )  # fmt: skip
    # equal up to float rounding: the last versions' stacks also held the trips that
    # would have flushed after the stop (a stack's size changes the summation order)
    torch.testing.assert_close(stopped.parameters, shorter.parameters, rtol=1e-5, atol=1e-6)
    assert stopped.schedule.stopped_early and stopped.schedule.server_steps == done
    for name in ("client", "version", "flush", "staleness", "flush_time"):
        assert np.array_equal(getattr(stopped.schedule, name), getattr(shorter.schedule, name))
    again = sim.run_federation(cfg, TRAIN, TEST, population, path, progress=False)
    assert again.history == stopped.history  # the checkpoint says it stopped: no more steps
    with pytest.raises(ConfigError, match=r"stop_at must be an accuracy in \(0, 1\]"):
        config(stop_at=1.5)
