"""One simulated federation in a run folder: config.json, checkpoint, metrics.json, model.

The folder rules are those of every labeldp run: a finished federation (metrics.json
written) is never overwritten or rerun; an unfinished one resumes from its checkpoint
(the same configuration only: config.json must match); files are written atomically and
metrics.json last; a folder lock keeps two processes out of one folder.

The record (:class:`FederationRecord`, metrics.json) holds the evaluations (test accuracy
and loss against server steps, virtual time and client trips), the schedule's summary
(trips, dropped trips, staleness mean/p50/p99 and histogram, achieved concurrency), the
two ledgers (label DP: replace one label; user level: one user), buffer overflows and
provenance.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.dataset import load_splits
from ..errors import ConfigError
from ..io import atomic_write_json, read_json
from ..locking import folder_lock
from ..provenance import numerics, provenance
from ..records import number_from_json, number_to_json
from ..seeding import Stream, derive_seed
from ..train.device import resolve_device
from .options import FederationOptions, build_population
from .schedule import Schedule
from .simulator import FederationResult, run_federation

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

    @property
    def final_accuracy(self) -> float:
        return float(self.history[-1]["test_accuracy"])

    @property
    def label_epsilon(self) -> float:
        return float(self.history[-1]["label_epsilon"])

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["history"] = [
            {k: number_to_json(v) if isinstance(v, float) else v for k, v in row.items()}
            for row in self.history
        ]
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FederationRecord:
        data = dict(data)
        data["history"] = [
            {k: number_from_json(v) if k.endswith("epsilon") else v for k, v in row.items()}
            for row in data["history"]
        ]
        return cls(**data)


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
    )


def run_folder(
    options: FederationOptions,
    seed: int,
    out: str | Path,
    dataset: str = "fashion-mnist",
    data_dir: str | None = None,
    device: str = "auto",
    progress: bool = True,
) -> FederationRecord:
    """Runs (or resumes, or reads back when finished) the federation ``options`` with
    ``seed`` in folder ``out``; returns its record."""
    out = Path(out)
    config = {"kind": "federation", "dataset": dataset, "seed": seed, "options": options.to_dict()}
    with folder_lock(out):
        metrics, saved = out / "metrics.json", out / "config.json"
        if saved.exists():
            if read_json(saved, f"delete {out} to start again") != config:
                state = "a finished" if metrics.exists() else "an unfinished"
                raise ConfigError(
                    f"{out} holds {state} federation of another configuration; "
                    "use another --out or delete it"
                )
            if metrics.exists():  # finished: never rerun or overwritten
                return FederationRecord.from_json(read_json(metrics, f"delete {out} to rerun"))
        else:
            atomic_write_json(saved, config)
        target = resolve_device(device)
        train, test = load_splits(dataset, data_dir=data_dir, device=target)
        population = build_population(
            options, train.labels.cpu().numpy(), derive_seed(seed, Stream.FL_POPULATION)
        )
        result = run_federation(
            options.config(seed), train, test, population, out / "checkpoint.pt", progress
        )
        record = federation_record(options, seed, dataset, result)
        record = FederationRecord(**{**asdict(record), "provenance": {
            **provenance(), "numerics": numerics(target), "population": population.layout,
        }})  # fmt: skip
        torch.save({"parameters": result.parameters.cpu()}, out / "model.pt")
        atomic_write_json(metrics, record.to_json())
        (out / "checkpoint.pt").unlink(missing_ok=True)
        return record


def time_to_target(
    history: list[dict[str, Any]], target: float, axis: str = "virtual_time"
) -> float:
    """The first ``axis`` value (virtual_time, trips or server_steps) at which the
    best-so-far test accuracy reaches ``target`` (in [0, 1]), interpolated linearly
    between the two evaluations around the crossing; ∞ when it never does."""
    best, previous = -math.inf, None
    for row in history:
        acc, x = float(row["test_accuracy"]), float(row[axis])
        if acc >= target and best < target:
            if previous is None:
                return x
            x0, a0 = previous
            return x0 + (x - x0) * (target - a0) / (acc - a0) if acc > a0 else x
        if acc > best:
            best = acc
        previous = (x, best)
    return math.inf
