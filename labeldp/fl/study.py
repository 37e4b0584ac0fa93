"""Federated sweep files: a grid of simulated federations, run resumably into the store.

A federated sweep file is a TOML file with ``kind = "federation"``::

    name = "fl_algorithms"
    kind = "federation"
    description = "..."
    dataset = "fashion-mnist"
    seeds = [0, 1, 2]
    target_accuracy = 0.7        # the report's time-to-target (test accuracy in [0, 1])
    baseline = "central.toml"    # optional: a centralized sweep file next to this one, whose
                                 # test accuracy per ε the report sets beside each variant
    [options]                    # FederationOptions for every point (docs/FL_OPTIONS.md)
    layout = "dirichlet"
    [grid]                       # Cartesian product over any FederationOptions key
    algorithm = ["fedavg", "fedbuff"]
    concurrency = [100, 1000]
    [when.fedavg]                # options for the points of one algorithm
    server_steps = 50

In ``[grid]``, ``epsilon = inf`` means no label DP (label_privacy "none"). Every point
is validated (its FederationOptions built) before anything runs. Points are named
``<algorithm>-<key><value>...-seed<seed>`` and run seed by seed (every grid point of
the first seed, then of the next) in folders RUNS_DIR/<name>/<point>;
each finished one is a row of the store's ``federated_runs`` table (one per (sweep,
configuration)), so rerunning the sweep skips them and an interrupted one resumes from its
checkpoint.
"""

from __future__ import annotations

import fnmatch
import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from ..errors import ConfigError
from ..options import specs
from .options import FederationOptions

KIND = "federation"
_TOP = {"name", "kind", "description", "dataset", "seeds", "target_accuracy", "options",
        "grid", "when", "reference", "baseline"}  # fmt: skip


def is_federated(path: str | Path) -> bool:
    """Whether the sweep file at ``path`` declares ``kind = "federation"``."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f).get("kind") == KIND
    except (OSError, tomllib.TOMLDecodeError):
        return False


@dataclass(frozen=True)
class StudyPoint:
    name: str
    options: FederationOptions
    seed: int
    variant: str  # the grid values without the seed, e.g. "fedbuff-concurrency100"

    @property
    def config(self) -> dict[str, Any]:
        return {"kind": KIND, "seed": self.seed, "options": self.options.to_dict()}


@dataclass(frozen=True)
class FederatedSweep:
    """A parsed, validated federated sweep file (see the module docstring)."""

    name: str
    path: Path
    description: str
    dataset: str
    seeds: tuple[int, ...]
    target_accuracy: float
    base: dict[str, Any]
    grid: dict[str, list[Any]]
    when: dict[str, dict[str, Any]]
    reference: str = ""
    baseline: str | None = None
    points: tuple[StudyPoint, ...] = field(default=())

    @classmethod
    def load(cls, path: str | Path) -> FederatedSweep:
        path = Path(path)
        with open(path, "rb") as f:
            data = tomllib.load(f)
        where = f"sweep file {path}"
        unknown = sorted(set(data) - _TOP)
        if unknown:
            raise ConfigError(
                f"{where}: unknown keys {', '.join(unknown)}; allowed: {', '.join(sorted(_TOP))}"
            )
        if data.get("kind") != KIND:
            raise ConfigError(f'{where}: not a federated sweep (kind = "{KIND}")')
        for key in ("name", "seeds", "target_accuracy"):
            if key not in data:
                raise ConfigError(f"{where}: needs {key}")
        seeds = data["seeds"]
        if not (
            isinstance(seeds, list) and seeds and all(isinstance(s, int) and s >= 0 for s in seeds)
        ):
            raise ConfigError(f"{where}: seeds must be a non-empty list of integers ≥ 0")
        target = data["target_accuracy"]
        if not (isinstance(target, (int, float)) and 0 < target <= 1):
            raise ConfigError(f"{where}: target_accuracy must be in (0, 1], got {target!r}")
        names = {s.name for s in specs(FederationOptions)}
        base = dict(data.get("options", {}))
        grid = dict(data.get("grid", {}))
        when = dict(data.get("when", {}))
        for table, keys in (("options", base), ("grid", grid),
                            *((f"when.{a}", w) for a, w in when.items())):  # fmt: skip
            bad = sorted(set(keys) - names)
            if bad:
                raise ConfigError(
                    f"{where}: [{table}] has unknown options {', '.join(bad)} "
                    f"(see docs/FL_OPTIONS.md)"
                )
        for key, values in grid.items():
            if not isinstance(values, list) or not values:
                raise ConfigError(f"{where}: [grid] {key} must be a non-empty list")
        spec = cls(
            name=data["name"], path=path, description=data.get("description", ""),
            dataset=data.get("dataset", "fashion-mnist"), seeds=tuple(seeds),
            target_accuracy=float(target), base=base, grid=grid, when=when,
            reference=data.get("reference", ""), baseline=data.get("baseline"),
        )  # fmt: skip
        if spec.baseline is not None and not (path.parent / spec.baseline).is_file():
            raise ConfigError(
                f"{where}: baseline {spec.baseline!r} is not a sweep file next to it"
            )
        object.__setattr__(spec, "points", tuple(spec._points(where)))
        return spec

    def _points(self, where: str) -> list[StudyPoint]:
        keys = list(self.grid)
        variants = []
        for values in itertools.product(*(self.grid[k] for k in keys)):
            chosen = dict(zip(keys, values, strict=True))
            options = {**self.base, **chosen}
            options = {
                **options,
                **self.when.get(options.get("algorithm", "fedbuff"), {}),
                **chosen,
            }
            if "epsilon" in chosen and chosen["epsilon"] == math.inf:
                options["epsilon"] = None
                options["label_privacy"] = "none"
            try:
                built = FederationOptions(**options)
            except ConfigError as e:
                raise ConfigError(f"{where}: grid point {chosen}: {e}") from None
            variants.append((_variant(chosen), built))
        # seed-major: an interrupted sweep has whole seeds of the grid, not whole variants
        return [
            StudyPoint(f"{variant}-seed{seed}", built, seed, variant)
            for seed in self.seeds
            for variant, built in variants
        ]

    def matching(self, only: str | None) -> list[StudyPoint]:
        """The points whose names match the shell pattern ``only`` (all when None)."""
        if only is None:
            return list(self.points)
        return [p for p in self.points if fnmatch.fnmatchcase(p.name, only)]


def _variant(chosen: dict[str, Any]) -> str:
    parts = []
    for key, value in chosen.items():
        text = (
            "inf"
            if value == math.inf
            else (f"{value:g}" if isinstance(value, float) else str(value))
        )
        parts.append(text if key == "algorithm" else f"{key.replace('_', '')}{text}")
    return "-".join(parts) or "base"


@dataclass(frozen=True)
class PointOutcome:
    """What a study point's task sends back: its record, the Ray node it ran on (None
    off Ray) and, in Ray's "return" mode, its run folder as a tar archive."""

    point: StudyPoint
    record: Any
    node: str | None = None
    archive: bytes | None = None


def _run_point(
    point: StudyPoint, folder: str, dataset: str, data_dir: str | None, device: str,
    progress: bool, threads: int | None, scratch: tuple[str | None, str] | None = None,
) -> PointOutcome:  # fmt: skip
    """Runs one study point (in this process, a worker process or a Ray task); with
    ``scratch`` (Ray's "return" mode: (scratch_dir, sweep name)) in a node-local folder
    whose files come back."""
    import torch

    from ..backends import current_node, pack_folder, scratch_root
    from .run import run_folder

    if threads:
        torch.set_num_threads(threads)
    where = Path(folder) if scratch is None else scratch_root(scratch[0]) / scratch[1] / point.name
    record = run_folder(point.options, point.seed, where, dataset, data_dir, device, progress)
    archive = pack_folder(where) if scratch is not None else None
    return PointOutcome(point, record, current_node(), archive)


def run_study(
    spec: FederatedSweep,
    store: Any,
    runs_dir: str | Path,
    data_dir: str | None = None,
    device: str = "auto",
    progress: bool = True,
    only: str | None = None,
    backend: Any = None,
) -> int:
    """Runs every point of ``spec`` the store does not hold (matching ``only``); returns
    how many ran. backend: where the points run (labeldp.backends: LocalBackend(workers),
    the default one at a time here, or RayBackend); this process alone writes the store,
    each point's row as soon as it finishes."""
    import datetime

    from ..backends import LocalBackend, RayBackend, drive, unpack_folder
    from ..store import run_key

    backend = backend if backend is not None else LocalBackend()
    points = spec.matching(only)
    if not points:
        raise ConfigError(f"--only {only!r} matches no point of {spec.name}")
    done = store.finished_federated_keys(spec.name)
    todo = [p for p in points if run_key(p.config) not in done]
    root = Path(runs_dir).resolve() / spec.name  # absolute: Ray tasks run elsewhere
    data_dir = str(Path(data_dir).resolve()) if data_dir is not None else None
    returning = isinstance(backend, RayBackend) and backend.run_folders == "return"
    scratch = (backend.scratch_dir, spec.name) if returning else None
    finished = 0

    def arguments(point: StudyPoint) -> tuple[Any, ...]:
        if progress:
            print(f"{spec.name}: {point.name} started ({len(points) - len(todo)} stored before)")
        return (point, str(root / point.name), spec.dataset, data_dir, device,
                progress and not backend.parallel, backend.threads, scratch)  # fmt: skip

    def finish(outcome: PointOutcome) -> None:
        nonlocal finished
        folder = root / outcome.point.name
        if outcome.archive is not None:
            unpack_folder(outcome.archive, folder)
        stamp = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        point = outcome.point
        store.record_federation(
            spec.name, point.name, point.variant, point.config, folder, outcome.record, stamp
        )
        finished += 1
        if progress:
            print(f"{spec.name}: {point.name} stored ({finished}/{len(todo)})")

    if todo:
        drive(backend.executor(device), todo, _run_point, arguments, finish,
              capacity=backend.capacity(len(todo)))  # fmt: skip
    return len(todo)
