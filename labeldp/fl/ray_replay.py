"""The federated replay on Ray actors (the optional extra ``labeldp[ray]``).

:class:`RayReplay` is a :class:`~labeldp.fl.simulator.Replay`: at the start it puts the
trip trainer (the images, the clients' released labels, the population and the
schedule's trip arrays) into Ray's object store once and starts ``actors`` actors that
each build their replica from it. Each server version, the driver deals the version's
chunks of trips round-robin to the actors (chunk i to actor i mod n; the chunks are
those of the local replay, ``chunk_size`` trips each), sends the flat parameters, and
merges the partial fixed-point buffers they return per flush. Integer sums are exact, so
the result is bit-identical to :class:`~labeldp.fl.simulator.LocalReplay` whenever each
chunk's float arithmetic is: the same torch build and per-process thread count
(``cpus_per_actor`` here, the torch threads of the local run there). Labels released
during a version (RRWithPrior: by the driver, with the downloaded model as prior) reach
every replica before its trips train.

Speed-up: the work of one server version is split between the actors; versions stay
sequential. A version with one trip (FedAsync, K = 1) gains nothing, FedBuff gains when
a version's trips fill several chunks (lower ``chunk_size`` to spread fewer trips), and
synchronous rounds (FedAvg) of many clients gain most.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..backends import check_resources, import_ray
from ..errors import ConfigError, check_int
from .buffer import FixedPointBuffer
from .simulator import Replay, TripTrainer


class _TripActor:
    """A replica of the trip trainer in a Ray actor."""

    def __init__(self, trainer: TripTrainer, threads: int) -> None:
        torch.set_num_threads(threads)
        self.trainer = trainer

    def update_labels(self, indices: torch.Tensor, values: torch.Tensor) -> None:
        self.trainer.labels.apply(indices, values)

    def train(self, x: torch.Tensor, chunks: list[np.ndarray]) -> dict[int, dict[str, Any]]:
        return {f: b.state_dict() for f, b in self.trainer.train(x, chunks).items()}


class RayReplay(Replay):
    """Trains each server version's trips on ``actors`` ≥ 1 Ray actors of
    ``cpus_per_actor`` ≥ 1 CPUs (and torch threads) each. Starts Ray on this machine when
    it is not running (``address`` None; or joins ``address``) and stops what it started."""

    def __init__(
        self, actors: int = 2, cpus_per_actor: int = 1, address: str | None = None
    ) -> None:
        check_int("actors", actors, 1)
        check_int("cpus_per_actor", cpus_per_actor, 1)
        self.actors, self.cpus_per_actor, self.address = actors, cpus_per_actor, address
        self._started = False
        self._handles: list[Any] = []

    def start(self, trainer: TripTrainer) -> None:
        ray = import_ray()
        if not ray.is_initialized():
            ray.init(
                address=self.address,
                num_cpus=self.actors * self.cpus_per_actor if self.address is None else None,
                include_dashboard=False,
                log_to_driver=False,
                configure_logging=False,
            )
            self._started = True
        if trainer.device.type != "cpu":
            self.stop()
            raise ConfigError(
                "the Ray replay's actors train on CPU: use --device cpu with --backend ray "
                f"(the federation's tensors are on {trainer.device})"
            )
        try:
            check_resources(self.cpus_per_actor, 0, self.actors)
        except ConfigError:
            self.stop()
            raise
        self._trainer = trainer
        actor = ray.remote(_TripActor).options(num_cpus=self.cpus_per_actor)
        shared = ray.put(trainer)  # once into the object store, read by every actor
        self._handles = [actor.remote(shared, self.cpus_per_actor) for _ in range(self.actors)]

    def update_labels(self, indices: torch.Tensor, values: torch.Tensor) -> None:
        if len(indices):
            ray = import_ray()
            ray.get([h.update_labels.remote(indices, values) for h in self._handles])

    def train_version(
        self, x: torch.Tensor, chunks: list[np.ndarray]
    ) -> dict[int, FixedPointBuffer]:
        ray = import_ray()
        shares = [chunks[i :: self.actors] for i in range(self.actors)]
        x_ref = ray.put(x)
        calls = [h.train.remote(x_ref, share) for h, share in zip(self._handles, shares,
                 strict=True) if share]  # fmt: skip
        merged: dict[int, FixedPointBuffer] = {}
        for states in ray.get(calls):
            for f, state in states.items():
                part = self._trainer.buffer(f)
                part.load_state_dict(state)
                if f in merged:
                    merged[f].merge(part)
                else:
                    merged[f] = part
        return merged

    def stop(self) -> None:
        ray = import_ray()
        for handle in self._handles:
            ray.kill(handle)
        self._handles = []
        if self._started:
            ray.shutdown()
            self._started = False
