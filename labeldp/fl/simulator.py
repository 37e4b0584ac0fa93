"""Phase B of a federated simulation: replay the schedule version by version.

FedAvg, FedAvgM, FedAsync and FedBuff are one code path: a schedule
(:mod:`labeldp.fl.schedule`: "sync" rounds or "async" buffered arrivals), an aggregation
rule (staleness weight s(τ), fixed-point buffer, division by the fixed K) and a server
optimizer (:class:`~labeldp.fl.server.ServerOptimizer`). The names are presets
(:data:`ALGORITHMS`) checked against the configuration:

- fedavg: sync rounds of M clients, server SGD η_g = 1 by default, no momentum.
- fedavgm: the same with server momentum β > 0.
- fedasync: async with K = 1 and FedBuff's convention (x ← x − η_g·s(τ)·Δ, Δ the client's
  update), not Xie et al.'s mixing x ← (1−α)x + α·x_client; the two coincide only for
  η_g·s(τ) = α with a single local model.
- fedbuff: async with K ≥ 1 (K = 10 in the paper).

Replay. For server version v = 0, 1, …: every aggregated trip that downloaded version v
trains now, together (:func:`~labeldp.fl.clients.train_trips`, in chunks of
``chunk_size`` trips); each update is clipped (user-level DP only), weighted by s(τ) ≤ 1
and added, in fixed point, to the buffer of the flush it lands in (possibly a later one:
stale updates wait for their flush). Then flush v: the buffer's exact integer sum is
decoded, user-level noise N(0, σ²C²) is added once (DP-FedBuff), the sum is divided by K
(async: the configured K, never the realised sum of weights; sync: the round's number of
contributions) and the server optimizer steps: version v + 1. A trip's randomness is keyed
by (client, participation number), so results do not depend on chunking or grouping.

Evaluation every ``eval_every`` server steps (and after the last): accuracy and loss on
the evaluation split (``run_federation``'s ``test``: the test split, or a validation split
for tuning),
virtual time, client trips completed (the communication axis), trips aggregated and
dropped, bytes up and down, staleness so far, the label ε and the user-level (ε, δ).
Checkpoints every ``checkpoint_every`` server steps, atomically: a run killed at any point
resumes from its last checkpoint and finishes exactly as an uninterrupted one.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..augment import Normalize
from ..data.dataset import DeviceDataset
from ..errors import ConfigError, check_int
from ..models import build_model
from ..privacy import PrivacyLedger
from ..seeding import Stream, derive_seed
from ..train.checkpoint import load_checkpoint, save_checkpoint
from .buffer import FixedPoint, FixedPointBuffer
from .clients import LocalTraining, flat_parameters, train_trips, unflatten
from .label_privacy import ClientLabels
from .population import Population
from .schedule import Schedule, ScheduleConfig, simulate_schedule
from .server import ServerOptimizer
from .staleness import StalenessWeight
from .user_dp import clip_updates, flush_noise, user_level_epsilon, user_level_event

ALGORITHMS = ("fedavg", "fedavgm", "fedasync", "fedbuff")


@dataclass(frozen=True)
class FederatedConfig:
    """Everything that determines a simulated federation's result (besides the data and
    the population).

    algorithm: one of :data:`ALGORITHMS` (checked against ``schedule`` and ``server``).
    schedule: timing (:class:`ScheduleConfig`). local: the clients' training.
    server: the server optimizer. staleness: s(τ) (async; sync trips have τ = 0).
    label_privacy / epsilon: the clients' label mechanism (:mod:`labeldp.fl.label_privacy`)
    and its ε per label. clip / noise_multiplier: user-level DP (DP-FedBuff): each
    update's L2 norm clipped to C (> 0) and N(0, σ²C²) added to each flush's sum; σ = 0
    with a clip is clipping alone; both None/0: no user-level DP. delta: δ of the
    user-level (ε, δ). model / norm: the architecture (no BatchNorm). frac_bits: the
    buffer's fixed-point fraction bits f (values are multiples of 2^−f). chunk_size:
    trips per vectorized call. forward: StackedModels' forward ("auto", "vmap", "grouped",
    "loop").
    eval_every / checkpoint_every: server steps between evaluations / checkpoints.
    stop_at: stop at the first evaluation whose accuracy is ≥ this (in (0, 1]; None: run
    every server step): a time-to-target study need not train past its target. The
    result's schedule is then cut there (:meth:`Schedule.until`).
    seed: the run seed (schedule, model initialisation, trips, label noise, user noise).
    """

    algorithm: str = "fedbuff"
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    local: LocalTraining = field(default_factory=LocalTraining)
    server: ServerOptimizer = field(default_factory=ServerOptimizer)
    staleness: StalenessWeight = field(default_factory=StalenessWeight)
    label_privacy: str = "none"
    epsilon: float | None = None
    clip: float | None = None
    noise_multiplier: float = 0.0
    delta: float = 1e-5
    model: str = "cnn-tanh"
    norm: str = "group"
    frac_bits: int = 32
    chunk_size: int = 256
    forward: str = "auto"
    eval_every: int = 10
    checkpoint_every: int = 50
    stop_at: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ConfigError(
                f"algorithm must be one of {', '.join(ALGORITHMS)}, got {self.algorithm!r}"
            )
        mode, k, beta = self.schedule.mode, self.schedule.buffer_size, self.server.momentum
        wanted = {
            "fedavg": (mode == "sync" and beta == 0, "mode 'sync' and server_momentum 0"),
            "fedavgm": (mode == "sync" and beta > 0, "mode 'sync' and server_momentum > 0"),
            "fedasync": (mode == "async" and k == 1, "mode 'async' and buffer_size 1"),
            "fedbuff": (mode == "async", "mode 'async'"),
        }
        ok, needs = wanted[self.algorithm]
        if not ok:
            raise ConfigError(f"algorithm {self.algorithm!r} needs {needs}")
        if self.clip is not None and not (math.isfinite(self.clip) and self.clip > 0):
            raise ConfigError(f"clip must be a finite number > 0 (an L2 norm), got {self.clip!r}")
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0):
            raise ConfigError(
                f"noise_multiplier must be a finite number ≥ 0, got {self.noise_multiplier!r}"
            )
        if self.noise_multiplier > 0:
            if self.clip is None:
                raise ConfigError("noise_multiplier > 0 needs clip (the noise is σ·C)")
            if self.schedule.participation_cap is None:
                raise ConfigError(
                    "user-level DP needs participation_cap (m): without Poisson sampling "
                    "there is no amplification, and the guarantee is m compositions"
                )
        if not 0 < self.delta < 1:
            raise ConfigError(f"delta must be in (0, 1), got {self.delta!r}")
        check_int("frac_bits", self.frac_bits, 1)
        check_int("chunk_size", self.chunk_size, 1)
        check_int("eval_every", self.eval_every, 1)
        check_int("checkpoint_every", self.checkpoint_every, 1)
        if self.stop_at is not None and (
            isinstance(self.stop_at, bool)
            or not isinstance(self.stop_at, (int, float))
            or not 0 < self.stop_at <= 1
        ):
            raise ConfigError(f"stop_at must be an accuracy in (0, 1], got {self.stop_at!r}")
        check_int("seed", self.seed, 0)
        if self.norm == "batch":
            raise ConfigError(
                "norm must be 'group' (clients train as stacked models: no BatchNorm)"
            )

    @property
    def user_level(self) -> bool:
        return self.noise_multiplier > 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FederationResult:
    """What a simulation returns: the evaluations (``history``, one dict per evaluation),
    the final parameters (flat), the schedule, the label-DP ledger ("replace one label")
    and the user-level ledger ("one user"; empty without user-level DP)."""

    history: list[dict[str, Any]]
    parameters: torch.Tensor
    schedule: Schedule
    label_ledger: PrivacyLedger
    user_ledger: PrivacyLedger
    overflows: int
    seconds: float


def _normalize(info) -> Normalize:
    return Normalize(info.mean, info.std)


def _generator(seed: int, stream: Stream, *index: int, device="cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(derive_seed(seed, stream, *index))


@torch.no_grad()
def _evaluate(model, params, test: DeviceDataset, normalize) -> tuple[float, float]:
    with torch.no_grad():
        for k, p in model.named_parameters():
            p.copy_(params[k])
    model.eval()
    correct, loss = 0, 0.0
    for start in range(0, len(test), 1000):
        x = normalize(test.images[start : start + 1000])
        logits = model(x)
        y = test.labels[start : start + 1000]
        correct += int((logits.argmax(1) == y).sum())
        loss += float(F.cross_entropy(logits, y, reduction="sum"))
    return correct / len(test), loss / len(test)


def _user_ledger(config: FederatedConfig) -> PrivacyLedger:
    from ..privacy import LedgerEntry, Neighbouring

    ledger = PrivacyLedger()
    if config.user_level:
        m = config.schedule.participation_cap
        ledger.record(
            LedgerEntry(
                mechanism="dp-fedbuff-gaussian",
                epsilon=user_level_epsilon(config.noise_multiplier, m, config.delta),
                delta=config.delta,
                details={
                    "noise_multiplier": config.noise_multiplier,
                    "clip": config.clip,
                    "participations_cap": m,
                    "amplification": "none",
                },
                relation=Neighbouring.ONE_USER,
                event=user_level_event(config.noise_multiplier, m),
                event_note="m Gaussian mechanisms of sensitivity C on the flush sums, "
                "composed without amplification (RDP)",
            )
        )
    return ledger


def run_federation(
    config: FederatedConfig,
    train: DeviceDataset,
    test: DeviceDataset,
    population: Population,
    checkpoint_path: str | Path | None = None,
    progress: bool = True,
    replay: Replay | None = None,
) -> FederationResult:
    """Simulates ``config`` on the clients of ``population`` (indices into ``train``) and
    evaluates the global model on ``test``. Resumes from ``checkpoint_path`` when it
    exists (written by the same configuration; refused otherwise).

    replay: who trains each version's trips (:class:`LocalReplay`, the default: this
    process; :class:`labeldp.fl.ray_replay.RayReplay`: Ray actors). The fixed-point
    buffer makes the result bit-identical under either, given the same per-process
    torch thread count (the float arithmetic of each chunk of trips)."""
    began = time.perf_counter()
    if population.num_examples != len(train):
        raise ConfigError(
            f"the population deals {population.num_examples} examples but the training "
            f"split has {len(train)}"
        )
    device = train.images.device
    info = train.info
    normalize = _normalize(info)
    schedule = simulate_schedule(
        config.schedule, population.num_clients,
        np.random.default_rng(derive_seed(config.seed, Stream.FL_SCHEDULE)), population.sizes,
    )  # fmt: skip
    torch.manual_seed(derive_seed(config.seed, Stream.MODEL_INIT))
    model = build_model(
        config.model, num_classes=info.num_classes, in_channels=info.channels,
        image_size=info.image_size, norm=config.norm,
    ).to(device)  # fmt: skip
    like = {k: v.detach() for k, v in model.named_parameters()}
    x = flat_parameters(like).double()
    size = x.numel()
    labels = ClientLabels(
        config.label_privacy, config.epsilon, train.labels, info.num_classes,
        _generator(config.seed, Stream.FL_LABEL_NOISE, device=device),
    )  # fmt: skip
    fixed = FixedPoint(frac_bits=config.frac_bits, total_bits=62)
    K = config.schedule.aggregation_size
    aggregated = np.flatnonzero(schedule.aggregated)
    by_version = aggregated[np.argsort(schedule.version[aggregated], kind="stable")]
    version_starts = np.searchsorted(
        schedule.version[by_version], np.arange(schedule.server_steps + 1)
    )
    weights = np.zeros(len(schedule))
    weights[aggregated] = config.staleness(schedule.staleness[aggregated])
    pending: dict[int, FixedPointBuffer] = {}
    momentum = None
    history: list[dict[str, Any]] = []
    overflows = 0
    start_version = 0
    stopped = False  # at an evaluation reaching stop_at
    fingerprint = {
        "config": config.to_dict(),
        "population": population.layout,
        "clients": population.num_clients,
        "examples": population.num_examples,
    }
    path = Path(checkpoint_path) if checkpoint_path is not None else None
    if path is not None and path.exists():
        state = load_checkpoint(
            path,
            fingerprint=fingerprint,
            device=device,
            mismatch=f"{path} was written by another federation",
        )
        x = state["x"]
        momentum = state["momentum"]
        labels.load_state_dict(state["labels"])
        for f, saved in state["pending"].items():
            buf = _flush_buffer(size, fixed, schedule.flush_count, int(f), device)
            buf.load_state_dict(saved)
            pending[int(f)] = buf
        history = state["history"]
        overflows = state["overflows"]
        start_version = state["version"]
        stopped = state.get("stopped", False)
    label_ledger = labels.ledger()
    user_ledger = _user_ledger(config)
    eval_model = build_model(
        config.model, num_classes=info.num_classes, in_channels=info.channels,
        image_size=info.image_size, norm=config.norm,
    ).to(device)  # fmt: skip
    bar = tqdm(
        total=schedule.server_steps,
        initial=start_version,
        desc=config.algorithm,
        disable=not progress,
    )
    trainer = TripTrainer(
        config, model, normalize, train.images, labels, population, schedule, weights, fixed
    )
    engine = replay if replay is not None else LocalReplay()
    engine.start(trainer)
    try:
        for v in range(start_version, schedule.server_steps):
            if stopped:
                break
            trips = by_version[version_starts[v] : version_starts[v + 1]]
            per_chunk = config.chunk_size
            chunks = [trips[i : i + per_chunk] for i in range(0, len(trips), per_chunk)]
            if labels.needs_prior:
                # each trip's client releases its new labels with the downloaded model first
                before = labels.released.clone()
                params = unflatten(x.float(), like)
                for rows in chunks:
                    examples = trainer.examples(rows)
                    _release(labels, model, params, train, normalize, examples,
                             trainer.keys(rows), config.seed)  # fmt: skip
                fresh = torch.nonzero(labels.released & ~before).flatten()
                engine.update_labels(fresh, labels.noisy[fresh])
            for f, partial in engine.train_version(x.float(), chunks).items():
                if f not in pending:
                    pending[f] = trainer.buffer(f)
                pending[f].merge(partial)
            buf = pending.pop(v, None)
            total = buf.total() if buf is not None else torch.zeros(size, dtype=torch.float64)
            if buf is not None:
                overflows += buf.overflows
            if config.user_level:
                total = total + flush_noise(
                    size, config.noise_multiplier, config.clip,
                    _generator(config.seed, Stream.FL_USER_NOISE, v, device=device),
                ).to(total)  # fmt: skip
            divisor = K if config.schedule.mode == "async" else max(1, int(schedule.flush_count[v]))
            x, momentum = config.server.step(x, total / divisor, momentum)
            if not bool(torch.isfinite(x).all()):
                raise RuntimeError(
                    f"the global model diverged at server step {v + 1} (non-finite weights): "
                    "lower server_lr or the clients' lr"
                )
            done = v + 1
            if done % config.eval_every == 0 or done == schedule.server_steps:
                history.append(
                    _evaluation(
                        done,
                        schedule,
                        eval_model,
                        unflatten(x.float(), like),
                        test,
                        normalize,
                        size,
                        config,
                        label_ledger,
                        user_ledger,
                    )
                )
                stopped = config.stop_at is not None and history[-1]["accuracy"] >= config.stop_at
            if path is not None and (
                done % config.checkpoint_every == 0 or done == schedule.server_steps or stopped
            ):
                save_checkpoint(path, {
                    "fingerprint": fingerprint, "version": done, "x": x, "momentum": momentum,
                    "labels": labels.state_dict(),
                    "pending": {f: b.state_dict() for f, b in pending.items()},
                    "history": history, "overflows": overflows, "stopped": stopped,
                })  # fmt: skip
            bar.update(1)
    finally:
        engine.stop()
    bar.close()
    return FederationResult(
        history,
        x.float(),
        schedule.until(history[-1]["server_steps"]) if stopped else schedule,
        label_ledger,
        user_ledger,
        overflows,
        time.perf_counter() - began,
    )


class TripTrainer:
    """Trains chunks of one server version's trips and returns their contributions:
    each update clipped (user-level DP only), weighted by s(τ) and added, in fixed point,
    to a partial buffer of the flush it lands in. Holds what that needs (the images, the
    clients' targets, the population and the schedule's trip arrays) so that it can live
    in another process (a Ray actor) as well as here."""

    def __init__(
        self,
        config: FederatedConfig,
        model: torch.nn.Module,
        normalize: Normalize,
        images: torch.Tensor,
        labels: ClientLabels,
        population: Population,
        schedule: Schedule,
        weights: np.ndarray,
        fixed: FixedPoint,
    ) -> None:
        self.config, self.model, self.normalize = config, model, normalize
        self.images, self.labels, self.population = images, labels, population
        self.targets = labels.targets()
        self.weights, self.fixed = weights, fixed
        self.device = images.device
        self.size = sum(p.numel() for p in model.parameters())
        self.client = schedule.client
        self.participation = schedule.participation
        self.flush = schedule.flush
        self.flush_count = schedule.flush_count

    def examples(self, rows: np.ndarray) -> list[torch.Tensor]:
        return [
            torch.tensor(self.population.client(int(c)), device=self.device)
            for c in self.client[rows]
        ]

    def keys(self, rows: np.ndarray) -> list[tuple[int, int]]:
        """(client, participation number) of each trip: its randomness' key."""
        return [(int(self.client[t]), int(self.participation[t])) for t in rows]

    def train(self, x: torch.Tensor, chunks: list[np.ndarray]) -> dict[int, FixedPointBuffer]:
        """The partial buffers, by flush, of the trips ``chunks`` (each trained in one
        vectorized call) starting from the flat float32 parameters ``x``."""
        config = self.config
        like = {k: v.detach() for k, v in self.model.named_parameters()}
        params = unflatten(x.to(self.device), like)
        partial: dict[int, FixedPointBuffer] = {}
        for rows in chunks:
            generators = [
                _generator(config.seed, Stream.FL_TRIP, c, p) for c, p in self.keys(rows)
            ]
            deltas = train_trips(
                self.model, params, self.images, self.targets, self.examples(rows), generators,
                config.local, self.normalize, forward=config.forward,
            ).double()  # fmt: skip
            if config.clip is not None:
                deltas, _ = clip_updates(deltas, config.clip)
            deltas = deltas * torch.from_numpy(self.weights[rows]).to(deltas)[:, None]
            flushes = self.flush[rows]
            for f in np.unique(flushes):
                f = int(f)
                if f not in partial:
                    partial[f] = self.buffer(f)
                partial[f].add(deltas[torch.from_numpy(flushes == f)])
        return partial

    def buffer(self, flush: int) -> FixedPointBuffer:
        """An empty buffer (or partial buffer) of flush ``flush``."""
        return _flush_buffer(self.size, self.fixed, self.flush_count, flush, self.device)


class Replay:
    """Who trains each server version's trips (see :func:`run_federation`)."""

    def start(self, trainer: TripTrainer) -> None:
        raise NotImplementedError

    def update_labels(self, indices: torch.Tensor, values: torch.Tensor) -> None:
        """Labels released this version (RRWithPrior), before the trips train."""

    def train_version(
        self, x: torch.Tensor, chunks: list[np.ndarray]
    ) -> dict[int, FixedPointBuffer]:
        raise NotImplementedError

    def stop(self) -> None:
        """Releases what :meth:`start` took."""


class LocalReplay(Replay):
    """Every chunk of trips in this process, one after another."""

    def start(self, trainer: TripTrainer) -> None:
        self.trainer = trainer

    def train_version(
        self, x: torch.Tensor, chunks: list[np.ndarray]
    ) -> dict[int, FixedPointBuffer]:
        return self.trainer.train(x, chunks)


def _flush_buffer(
    size: int, fixed: FixedPoint, flush_count: np.ndarray, flush: int, device
) -> FixedPointBuffer:
    """An empty fixed-point buffer of ``flush``: capacity its number of contributions (at
    least 1, for a flush that aggregates none)."""
    return FixedPointBuffer(size, fixed, max(1, int(flush_count[flush])), device)


@torch.no_grad()
def _release(labels, model, params, train, normalize, examples, keys, seed) -> None:
    """RRWithPrior: each client releases its not-yet-released labels with the downloaded
    model's softmax as the prior, drawing from its (client, participation) stream."""
    for k, p in model.named_parameters():
        p.copy_(params[k])
    model.eval()

    def prior(indices: torch.Tensor) -> torch.Tensor:
        return torch.softmax(model(normalize(train.images[indices])), dim=1)

    for own, (client, participation) in zip(examples, keys, strict=True):
        labels.release(
            own,
            prior,
            _generator(
                seed, Stream.FL_LABEL_NOISE, client, participation, device=train.images.device
            ),
        )
    model.train()


def _evaluation(
    done, schedule, model, params, test, normalize, size, config, label_ledger, user_ledger
) -> dict[str, Any]:
    accuracy, loss = _evaluate(model, params, test, normalize)
    now = float(schedule.flush_time[done - 1])
    arrived = schedule.arrival_time <= now
    aggregated = schedule.aggregated & (schedule.flush < done)
    dropped = arrived & ~schedule.aggregated
    tau = schedule.staleness[aggregated]
    bytes_per_model = 4 * size
    return {
        "server_steps": done,
        "virtual_time": now,
        "trips": int(arrived.sum()),
        "trips_aggregated": int(aggregated.sum()),
        "trips_dropped": int(dropped.sum()),
        "bytes_up": int(arrived.sum()) * bytes_per_model,
        "bytes_down": int((schedule.dispatch_time <= now).sum()) * bytes_per_model,
        "accuracy": accuracy,
        "loss": loss,
        "staleness_mean": float(tau.mean()) if len(tau) else 0.0,
        "staleness_p50": float(np.percentile(tau, 50)) if len(tau) else 0.0,
        "staleness_p99": float(np.percentile(tau, 99)) if len(tau) else 0.0,
        "label_epsilon": label_ledger.epsilon if label_ledger.is_private else math.inf,
        "user_epsilon": user_ledger.epsilon if user_ledger.is_private else math.inf,
        "user_delta": config.delta if user_ledger.is_private else None,
    }
