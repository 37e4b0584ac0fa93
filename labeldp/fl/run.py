"""One simulated federation in a run folder: config.json, checkpoint, metrics.json, model.

The folder rules are those of every labeldp run: a finished federation (metrics.json
written) is never overwritten or rerun; an unfinished one resumes from its checkpoint
(the same configuration only: config.json must match); files are written atomically and
metrics.json last; a folder lock keeps two processes out of one folder.

The record (:class:`FederationRecord`, metrics.json) holds the evaluations (accuracy and
loss on its ``evaluation_split``: "test", or "validation" when ``validation_size`` carves
one from the training split for tuning, as :func:`labeldp.data.hold_out` does for every
run; the clients then hold only the rest) against server steps, virtual time and client
trips), the schedule's summary (trips, dropped trips, staleness mean/p50/p99 and
histogram, achieved concurrency), the two ledgers (label DP: replace one label; user
level: one user), buffer overflows and provenance.

Canaries and audits (``canaries``, ``audit_canaries``, ``canary_clients``): planted as
:mod:`labeldp.runner` plants them (:func:`attacks.canaries.plant`, the run seed's
Stream.CANARIES, on the true training labels, label-independently chosen), before the
clients' label mechanism (:class:`~labeldp.fl.label_privacy.ClientLabels`) sees any
label; the population is laid out from the true labels (see
:func:`~labeldp.fl.options.build_population`) and the clients train on the planted ones.
``diagnostics/canaries.pt`` and, after training, ``diagnostics/outputs.pt`` (the final
global model's outputs, :func:`attacks.outputs.collect_outputs`) are what
:mod:`attacks.harness` reads; it writes ``attack.json`` before metrics.json, whose
``attack`` holds each audit's ε_LB and the bound tested: the LABEL ε (replace one label,
what a canary changes), ∞ without label DP, never the user-level ε. ``labeldp attack`` on
the folder recomputes the same attack.json. Without canaries none of this is written.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from attacks.canaries import Canaries, plant
from attacks.harness import attack_claim, federation_claim
from attacks.outputs import collect_outputs

from ..augment import Normalize
from ..data.dataset import DeviceDataset, hold_out, load_splits
from ..errors import ConfigError
from ..io import atomic_write, atomic_write_json, read_json
from ..locking import folder_lock
from ..models import build_model
from ..provenance import numerics, provenance
from ..records import AttackRecord, number_from_json, number_to_json, to_json_value
from ..run_folder import diagnostics_dir
from ..seeding import Stream, derive_seed
from ..train.device import resolve_device
from .clients import unflatten
from .options import FederationOptions, build_population
from .schedule import Schedule
from .simulator import FederationResult, Replay, run_federation

#: Staleness histogram bins: τ = 0 … STALENESS_BINS − 2, and one bin for all larger.
STALENESS_BINS = 64


@dataclass(frozen=True)
class FederationRecord:
    """metrics.json of a federation run (lossless JSON form: :meth:`to_json` /
    :meth:`from_json`; ∞ as "Infinity")."""

    options: dict[str, Any]
    seed: int
    dataset: str
    history: list[dict[str, Any]]
    schedule: dict[str, Any]
    label_ledger: dict[str, Any]
    user_ledger: dict[str, Any]
    overflows: int
    train_seconds: float
    provenance: dict[str, Any] = field(default_factory=dict)
    attack: dict[str, Any] | None = None
    evaluation_split: str = "test"

    @property
    def final_accuracy(self) -> float:
        return float(self.history[-1]["accuracy"])

    @property
    def label_epsilon(self) -> float:
        return float(self.history[-1]["label_epsilon"])

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["history"] = [
            {k: number_to_json(v) if isinstance(v, float) else v for k, v in row.items()}
            for row in self.history
        ]
        out["attack"] = to_json_value(self.attack)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FederationRecord:
        data = dict(data)
        data["history"] = [
            {k: number_from_json(v) if k.endswith("epsilon") else v for k, v in row.items()}
            for row in data["history"]
        ]
        attack = data.get("attack")
        if attack is not None:
            data["attack"] = {
                **attack,
                "epsilon_tested": number_from_json(attack["epsilon_tested"]),
                **{
                    name: None if attack[name] is None else _numbers(attack[name])
                    for name in AUDITS
                },
            }
        return cls(**data)

    @property
    def epsilon_lb(self) -> dict[str, float | None]:
        """Each audit's ε_LB ("memorization", "one_run"); None without the audit."""
        attack = self.attack or {}
        return {
            name: None if attack.get(name) is None else attack[name]["epsilon_lb"]
            for name in AUDITS
        }


#: The audits a federation's record summarizes (attack.json holds their details).
AUDITS = ("memorization", "one_run")


def _numbers(part: dict[str, Any]) -> dict[str, Any]:
    return {k: number_from_json(v) if k.startswith("epsilon") else v for k, v in part.items()}


def attack_summary(attack: AttackRecord) -> dict[str, Any]:
    """What a federation's record keeps of its attack.json: the bound tested (relation and
    ε: the label ε, ∞ without label DP), α, and per audit its ε_LB, the most its canaries
    can certify, their number and whether the ε_LB exceeds the bound."""
    tested = attack.bound_tested or {}
    out: dict[str, Any] = {
        "relation": tested.get("relation"),
        "epsilon_tested": float(tested.get("epsilon", math.inf)),
        "alpha": float(attack.alpha),
    }
    for name in AUDITS:
        part = attack.part(name)
        out[name] = None if part is None else {
            "epsilon_lb": float(part["epsilon_lb"]),
            "epsilon_lb_max": float(part["epsilon_lb_max"]),
            "canaries": int(part["canaries"]),
            "exceeds_bound": bool(part.get("exceeds_bound", False)),
        }  # fmt: skip
    return out


def schedule_summary(schedule: Schedule) -> dict[str, Any]:
    """Trips, dropped and unfinished trips, staleness statistics and histogram, achieved
    concurrency, and whether the schedule stopped early."""
    tau = schedule.staleness[schedule.aggregated]
    histogram = np.bincount(np.minimum(tau, STALENESS_BINS - 1), minlength=STALENESS_BINS)
    end = float(schedule.flush_time[-1]) if schedule.server_steps else 0.0
    arrived = schedule.arrival_time <= end
    return {
        "trips_dispatched": len(schedule),
        "trips_aggregated": int(schedule.aggregated.sum()),
        "trips_dropped": int((arrived & ~schedule.aggregated).sum()),
        "server_steps": schedule.server_steps,
        "virtual_time": end,
        "mean_concurrency": schedule.mean_concurrency(),
        "staleness": schedule.staleness_summary(),
        "staleness_histogram": histogram.tolist(),
        "stopped_early": schedule.stopped_early,
    }


def federation_record(
    options: FederationOptions, seed: int, dataset: str, result: FederationResult
) -> FederationRecord:
    return FederationRecord(
        options=options.to_dict(),
        seed=seed,
        dataset=dataset,
        history=result.history,
        schedule=schedule_summary(result.schedule),
        label_ledger=result.label_ledger.to_dict(),
        user_ledger=result.user_ledger.to_dict(),
        overflows=result.overflows,
        train_seconds=result.seconds,
        evaluation_split="test" if options.validation_size is None else "validation",
    )


def run_folder(
    options: FederationOptions,
    seed: int,
    out: str | Path,
    dataset: str = "fashion-mnist",
    data_dir: str | None = None,
    device: str = "auto",
    progress: bool = True,
    replay: Replay | None = None,
) -> FederationRecord:
    """Runs (or resumes, or reads back when finished) the federation ``options`` with
    ``seed`` in folder ``out``; returns its record. replay: who trains the trips
    (:func:`~labeldp.fl.simulator.run_federation`; None: this process)."""
    out = Path(out)
    config = {"kind": "federation", "dataset": dataset, "seed": seed, "options": options.to_dict()}
    with folder_lock(out):
        metrics, saved = out / "metrics.json", out / "config.json"
        if saved.exists():
            if _recorded(read_json(saved, f"delete {out} to start again")) != config:
                state = "a finished" if metrics.exists() else "an unfinished"
                raise ConfigError(
                    f"{out} holds {state} federation of another configuration; "
                    "use another --out or delete it"
                )
            if metrics.exists():  # finished: never rerun or overwritten
                return FederationRecord.from_json(read_json(metrics, f"delete {out} to rerun"))
        target = resolve_device(device)
        train, test = load_splits(dataset, data_dir=data_dir, device=target)
        if options.validation_size is not None:
            train, test = hold_out(train, options.validation_size, dataset)
        true_labels = train.labels
        canaries = plant_federation_canaries(options, seed, train, len(test))
        population = build_population(
            options, true_labels.cpu().numpy(), derive_seed(seed, Stream.FL_POPULATION),
            canaries=None if canaries is None else planted_examples(canaries).numpy(),
        )  # fmt: skip
        if canaries is not None:
            train = DeviceDataset(train.images, canaries.training_labels(true_labels), train.info)
        if not saved.exists():  # only once everything above was accepted
            atomic_write_json(saved, config)
        if canaries is not None:
            canaries.save(diagnostics_dir(out) / "canaries.pt")
        result = run_federation(
            options.config(seed), train, test, population, out / "checkpoint.pt", progress,
            replay,
        )
        record = federation_record(options, seed, dataset, result)
        record = FederationRecord(**{**asdict(record), "provenance": {
            **provenance(), "numerics": numerics(target), "population": population.layout,
        }})  # fmt: skip
        if canaries is not None:
            outputs = collect_outputs(
                global_model(options, seed, train, result.parameters), train.images,
                true_labels, test.images, test.labels, Normalize(train.info.mean, train.info.std),
                canaries,
                torch.Generator().manual_seed(derive_seed(seed, Stream.OUTPUT_SAMPLE)),
            )  # fmt: skip
            atomic_write(
                diagnostics_dir(out) / "outputs.pt", lambda handle: torch.save(outputs, handle)
            )
            attack = attack_claim(out, federation_claim(record))
            record = replace(record, attack=attack_summary(attack))
        torch.save({"parameters": result.parameters.cpu()}, out / "model.pt")
        atomic_write_json(metrics, record.to_json())
        (out / "checkpoint.pt").unlink(missing_ok=True)
        return record


def _recorded(config: dict[str, Any]) -> dict[str, Any]:
    """A recorded config.json with options added since it was written at their defaults."""
    try:
        return {**config, "options": FederationOptions(**config["options"]).to_dict()}
    except (ConfigError, TypeError, KeyError):
        return config


def plant_federation_canaries(
    options: FederationOptions, seed: int, train: DeviceDataset, num_test: int
) -> Canaries | None:
    """The canaries of ``options`` on the true labels of ``train``, planted as
    labeldp.runner plants them (same function, the run seed's Stream.CANARIES); None
    without canaries."""
    if not (options.canaries or options.audit_canaries):
        return None
    if options.canaries + options.audit_canaries > len(train) - 1:
        raise ConfigError(
            f"canaries + audit_canaries must be at most {len(train) - 1}, the {len(train)} "
            f"training examples less one (label inference needs an example that is not a "
            f"canary), got {options.canaries} + {options.audit_canaries}"
        )
    return plant(
        train.labels, train.info.num_classes, options.canaries, options.audit_canaries,
        num_test, torch.Generator().manual_seed(derive_seed(seed, Stream.CANARIES)),
    )  # fmt: skip


def planted_examples(canaries: Canaries) -> torch.Tensor:
    """The training examples whose labels were replaced (memorization and audit)."""
    return torch.cat([canaries.indices, canaries.audit_indices])


def global_model(
    options: FederationOptions, seed: int, train: DeviceDataset, parameters: torch.Tensor
) -> torch.nn.Module:
    """The final global model: the federation's architecture with the flat ``parameters``
    (:func:`~labeldp.fl.clients.unflatten`), on ``train``'s device, in eval mode."""
    config = options.config(seed)
    info = train.info
    model = build_model(
        config.model, num_classes=info.num_classes, in_channels=info.channels,
        image_size=info.image_size, norm=config.norm,
    ).to(train.images.device)  # fmt: skip
    like = {k: v.detach() for k, v in model.named_parameters()}
    params = unflatten(parameters.to(train.images.device).float(), like)
    with torch.no_grad():
        for k, p in model.named_parameters():
            p.copy_(params[k])
    return model.eval()


def time_to_target(
    history: list[dict[str, Any]], target: float, axis: str = "virtual_time"
) -> float:
    """The first ``axis`` value (virtual_time, trips or server_steps) at which the
    best-so-far accuracy (on the record's evaluation split) reaches ``target`` (in [0, 1]),
    interpolated linearly between the two evaluations around the crossing; ∞ when it
    never does."""
    best, previous = -math.inf, None
    for row in history:
        acc, x = float(row["accuracy"]), float(row[axis])
        if acc >= target and best < target:
            if previous is None:
                return x
            x0, a0 = previous
            return x0 + (x - x0) * (target - a0) / (acc - a0) if acc > a0 else x
        if acc > best:
            best = acc
        previous = (x, best)
    return math.inf
