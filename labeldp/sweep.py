"""Sweeps: a grid of runs defined in a TOML file, run resumably into the results store.

A sweep file (experiments/*.toml) names a dataset, the methods, an ε grid, seeds, the
training hyper-parameters and the canaries; see experiments/README.md for every key.
:func:`run_sweep` runs each grid point into its own run folder (``<runs>/<sweep>/<name>``)
and records it in the :class:`~labeldp.store.ResultsStore`. Finished runs are skipped; an
unfinished one continues from its last checkpoint; a row is stored only once its run
folder is complete. So Ctrl-C or ``kill -9`` at any point loses at most the epoch in
progress, and a rerun neither repeats nor duplicates anything.
"""

from __future__ import annotations

import datetime as _dt
import fnmatch
import os
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, fields
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from .errors import ConfigError
from .runner import Environment, RunConfig, format_epsilon, train_run
from .store import ResultsStore, run_key
from .train import TrainConfig

#: RunConfig fields that a sweep varies itself; every other RunConfig field (dataset,
#: model, norm, train_size, crop_padding, hflip, canaries, ...) may be set once, at the top
#: level of the sweep file, for all its runs.
VARIED = ("train", "method", "method_options")


@dataclass(frozen=True)
class SweepSpec:
    """One sweep: the grid ``methods × epsilons × seeds`` (+ the non-private run per seed).

    name: the sweep's name (the store and report key). run: the RunConfig fields shared
    by all runs (``dataset`` required; model, norm, train_size, canaries, ...), written at
    the top level of the sweep file.
    train: TrainConfig keywords shared by every run (the seed comes from ``seeds``).
    method_options: per method, extra hyper-parameters (e.g. ``{"alibi": {"noise": ...}}``).
    per_method: per method (or "none"), RunConfig fields that replace the shared ones for
        its runs, under "train" TrainConfig keywords that replace [train]'s, and under
        "epsilons" its own ε grid; e.g. DP-SGD's own model, norm and batch size
        (``[per_method.dp-sgd]`` in TOML).
    reference: published numbers to print beside ours: ``{"source": str, "epsilons":
    [...], "rows": {method: [accuracy in %, ...]}}``.
    """

    name: str
    methods: list[str]
    epsilons: list[float]
    run: dict[str, Any]
    seeds: list[int] = field(default_factory=lambda: [0])
    include_nonprivate: bool = True
    description: str = ""
    train: dict[str, Any] = field(default_factory=dict)
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    per_method: dict[str, dict[str, Any]] = field(default_factory=dict)
    reference: dict[str, Any] | None = None

    @classmethod
    def load(cls, path: str | Path) -> SweepSpec:
        """Reads and validates a sweep file; every problem names the file and the key."""
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"sweep file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"sweep file {path} is not valid TOML: {exc}") from None
        own = {f.name for f in fields(cls)} - {"run"}
        shared = {f.name for f in fields(RunConfig)} - set(VARIED)
        unknown = sorted(set(data) - own - shared)
        if unknown:
            known = ", ".join(sorted(own | shared))
            raise ConfigError(f"{path}: unknown keys {', '.join(unknown)}; known: {known}")
        missing = [k for k in ("name", "dataset", "methods", "epsilons") if k not in data]
        if missing:
            raise ConfigError(f"{path}: missing keys {', '.join(missing)}")
        if "seed" in data.get("train", {}):
            raise ConfigError(f"{path}: put seeds in 'seeds', not in [train]")
        for method, override in data.get("per_method", {}).items():
            if method not in [*data.get("methods", []), "none"]:
                raise ConfigError(f"{path}: [per_method.{method}] names no method of the sweep")
            bad = sorted(set(override) - shared - {"train", "epsilons"})
            if bad:
                raise ConfigError(
                    f"{path}: [per_method.{method}] cannot set {', '.join(bad)}; it takes "
                    f"train, epsilons and {', '.join(sorted(shared))}"
                )
            if "seed" in override.get("train", {}):
                raise ConfigError(f"{path}: put seeds in 'seeds', not in [per_method.{method}]")
        spec = cls(
            **{k: v for k, v in data.items() if k in own},
            run={k: v for k, v in data.items() if k in shared},
        )
        try:
            spec.runs()  # validates every grid point now, not halfway through the sweep
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        except TypeError as exc:
            raise ConfigError(f"{path}: bad [train] option: {exc}") from None
        return spec

    def method_epsilons(self, method: str) -> list[float]:
        """The ε grid of ``method``: its ``[per_method.<method>] epsilons`` if set (e.g.
        PATE-FM's published budgets), else the sweep's ``epsilons``."""
        return list(self.per_method.get(method, {}).get("epsilons", self.epsilons))

    @property
    def all_epsilons(self) -> list[float]:
        """Every ε of the grid, sorted: the union of the methods' grids."""
        return sorted({float(e) for m in self.methods for e in self.method_epsilons(m)})

    @property
    def dataset(self) -> str:
        return self.run["dataset"]

    @property
    def audited(self) -> bool:
        """Whether the runs carry canaries (and are therefore attacked)."""
        return bool(self.run.get("canaries") or self.run.get("audit_canaries"))

    def runs(self) -> list[tuple[str, RunConfig]]:
        """(name, config) of every grid point, seed by seed, non-private first."""
        grid = []
        for seed in self.seeds:
            points: list[tuple[str, float | None]] = (
                [("none", None)] if self.include_nonprivate else []
            )
            points += [(m, float(e)) for m in self.methods for e in self.method_epsilons(m)]
            for method, eps in points:
                options = dict(self.method_options.get(method, {}))
                if eps is not None:
                    options["epsilon"] = eps
                override = dict(self.per_method.get(method, {}))
                override.pop("epsilons", None)
                train = TrainConfig(**{**self.train, **override.pop("train", {})}, seed=seed)
                config = RunConfig(
                    **{**self.run, **override}, train=train, method=method, method_options=options
                )
                label = method if eps is None else f"{method}-eps{eps:g}"
                grid.append((f"{label}-seed{seed}", config))
        return grid


def _execute(
    name: str, config: dict[str, Any], run_dir: str, env: dict[str, Any], threads: int | None
):
    """Runs one grid point (in this process or a worker): train, attack, report back."""
    if threads:
        torch.set_num_threads(threads)
    from attacks.harness import attack_run

    run_config = RunConfig.from_dict(config)
    metrics = train_run(run_config, run_dir, Environment(**env), resume=True)
    attack = attack_run(run_dir) if run_config.canaries or run_config.audit_canaries else None
    return name, config, run_dir, metrics, attack


def run_sweep(
    spec: SweepSpec,
    store: ResultsStore,
    runs_root: str | Path = "runs",
    env: Environment | None = None,
    workers: int = 1,
    only: str | None = None,
) -> int:
    """Runs every grid point of ``spec`` not yet in ``store``; returns how many it ran.

    workers: runs at once (≥ 1); each worker process gets an equal share of the CPU
    threads. only: a shell-style pattern over run names (e.g. ``"pate-fm-*-seed0"``):
    run just the matching points (an error when none matches). Progress shows as one bar
    over the grid and a line per finished run."""
    if workers < 1:
        raise ConfigError(f"workers must be an integer ≥ 1, got {workers}")
    env = env or Environment()
    folder = Path(runs_root) / spec.name
    inner = asdict(env) | {"progress": env.progress and workers == 1}
    if inner["shared_dir"] is None:  # e.g. PATE's teachers, trained once per seed
        inner["shared_dir"] = str(folder / "shared")
    done = store.finished_keys(spec.name)
    grid = spec.runs()
    if only is not None:
        grid = [(n, c) for n, c in grid if fnmatch.fnmatchcase(n, only)]
        if not grid:
            names = ", ".join(n for n, _ in spec.runs())
            raise ConfigError(f"only: {only!r} matches no run of {spec.name}; runs: {names}")
    todo = [(n, c.to_dict()) for n, c in grid if run_key(c.to_dict()) not in done]
    bar = tqdm(
        total=len(grid),
        initial=len(grid) - len(todo),
        desc=f"sweep {spec.name}",
        unit="run",
        disable=not env.progress,
        dynamic_ncols=True,
    )

    def finish(name, config, run_dir, metrics, attack) -> None:
        # When the run itself finished (its provenance date), not when it was stored.
        stamp = metrics.get("date") or _dt.datetime.now(_dt.timezone.utc).isoformat(
            timespec="seconds"
        )
        store.record(spec.name, name, config, run_dir, metrics, attack, stamp)
        bar.update(1)
        bound = (
            ""
            if not attack or not attack.get("memorization")
            else f", ε_LB {attack['memorization']['epsilon_lb']}"
        )
        bar.write(
            f"{name}: accuracy {metrics['test_accuracy']:.4f}, "
            f"ε = {format_epsilon(metrics['epsilon'])}{bound}"
        )

    if workers == 1:
        for name, config in todo:
            finish(*_execute(name, config, str(folder / name), inner, None))
    else:
        threads = max(1, (os.cpu_count() or 1) // workers)
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            futures = [
                pool.submit(_execute, n, c, str(folder / n), inner, threads) for n, c in todo
            ]
            for future in as_completed(futures):
                finish(*future.result())
    bar.close()
    if env.progress:
        print(
            f"sweep {spec.name}: {len(grid)} runs in the store ({len(todo)} new)", file=sys.stderr
        )
    return len(todo)
