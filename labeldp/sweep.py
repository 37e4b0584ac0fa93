"""Sweeps: a grid of runs defined in a TOML file, run resumably into the results store.

A sweep file (a TOML file: the user's own, or one packaged in labeldp/experiments/) names a
dataset, the methods, an ε grid, seeds, the training hyper-parameters and the canaries; see
labeldp/experiments/README.md for every key.
:func:`run_sweep` runs each grid point into its own run folder (``<runs>/<sweep>/<name>``)
and records it in the :class:`~labeldp.store.ResultsStore`. Finished runs are skipped; an
unfinished one continues from its last checkpoint; a row is stored only once its run
folder is complete. So Ctrl-C or ``kill -9`` at any point loses at most the epoch in
progress, and a rerun neither repeats nor duplicates anything.

Each grid point's run folder is locked while it trains (labeldp.locking): a second copy
of the sweep skips the points the first one holds instead of training them twice.
Workers (``--workers``) die with the sweep process. Every run records its numerics
settings (thread count, torch version, device); a sweep does not mix runs made under
different ones unless ``allow_mixed_numerics``.
"""

from __future__ import annotations

import datetime as _dt
import fnmatch
import itertools
import json
import sys
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from .backends import LocalBackend, RayBackend
from .errors import ConfigError
from .locking import FolderLocked, folder_lock
from .methods import METHODS, method_parameters
from .provenance import describe_numerics, numerics
from .recipes import Recipe, recipe
from .runner import Environment, RunConfig, format_epsilon, train_run
from .store import ResultsStore, run_key
from .train import TrainConfig, resolve_device

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
    grid: a Cartesian product over further options (``[grid]`` in TOML), each key a list of
        values: ``"train.<field>"`` (a TrainConfig field, e.g. ``"train.lr"``), a shared
        RunConfig field (``model``, ``norm``, ``crop_padding``, ...) or
        ``"<method>.<option>"`` (an option of that method only, e.g. ``"rr.learning"``).
        Every run of the sweep takes every combination of the keys that apply to it
        (method keys apply to that method's runs); a grid value replaces the shared,
        per-method and method-option values. Each combination is a *variant*, named in the
        run's name and in the report (e.g. ``rr-eps1-lr0.05-learningposterior-seed0``).
    audits: the companion audit sweep (``audits = "<file>.toml"`` in TOML, a path relative
        to this sweep file), or None: a sweep of the same dataset whose runs are trained to
        memorize their canaries, run beside this one, whose ε_LB the report shows next to
        this sweep's accuracy (see :func:`SweepSpec.load` for what it must cover).
    audit_spec: the companion sweep, loaded and checked (None without ``audits``); set by
        :func:`SweepSpec.load`, not a key of the file.
    recipes: start every run from its method's recipe for the dataset
        (:mod:`labeldp.recipes`); the sweep's values replace the recipe's, in the order
        recipe < top level and ``[train]`` < ``[per_method.<m>]`` < ``[grid]`` (method
        options: recipe < ``[method_options.<m>]`` < ``[grid]``). False: TrainConfig
        defaults and the file alone (a tuning sweep that must not inherit a recipe).
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
    grid: dict[str, list[Any]] = field(default_factory=dict)
    recipes: bool = True
    audits: str | None = None
    audit_spec: SweepSpec | None = field(default=None, compare=False, repr=False)

    @classmethod
    def load(cls, path: str | Path, follow_audits: bool = True) -> SweepSpec:
        """Reads and validates a sweep file; every problem names the file and the key.
        follow_audits: also load and check the companion sweep named by ``audits`` (into
        ``audit_spec``); False leaves ``audit_spec`` None."""
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"sweep file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"sweep file {path} is not valid TOML: {exc}") from None
        own = {f.name for f in fields(cls)} - {"run", "audit_spec"}
        shared = {f.name for f in fields(RunConfig)} - set(VARIED)
        unknown = sorted(set(data) - own - shared)
        if unknown:
            known = ", ".join(sorted(own | shared))
            raise ConfigError(f"{path}: unknown keys {', '.join(unknown)}; known: {known}")
        missing = [k for k in ("name", "dataset", "methods", "epsilons") if k not in data]
        if missing:
            raise ConfigError(f"{path}: missing keys {', '.join(missing)}")
        _check_types(path, data)
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
            grid = spec.runs()  # validates every grid point now, not halfway through the sweep
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        except TypeError as exc:
            raise ConfigError(f"{path}: bad [train] option: {exc}") from None
        for method in spec.methods:
            if not spec.method_epsilons(method):
                raise ConfigError(f"{path}: method {method} has an empty ε grid (epsilons = [])")
        if not grid:
            raise ConfigError(
                f"{path}: the grid is empty (methods = {spec.methods}, seeds = {spec.seeds}, "
                f"include_nonprivate = {str(spec.include_nonprivate).lower()}): nothing to run"
            )
        if spec.audits is not None and follow_audits:
            spec = replace(spec, audit_spec=_load_audits(path, spec))
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
        return [(name, config) for name, config, _ in self.points()]

    def variants(self) -> dict[str, str]:
        """Each grid point's run key → its variant label ("" without a ``[grid]``)."""
        return {run_key(config.to_dict()): variant for _, config, variant in self.points()}

    def grid_keys(self, method: str) -> list[str]:
        """The ``[grid]`` keys that apply to ``method``'s runs, in file order."""
        return [k for k in self.grid if "." not in k or k.split(".", 1)[0] in ("train", method)]

    def points(self) -> list[tuple[str, RunConfig, str]]:
        """(name, config, variant) of every grid point, seed by seed, non-private first,
        then method by method, ε by ε, variant by variant."""
        grid = []
        for seed in self.seeds:
            points: list[tuple[str, float | None]] = (
                [("none", None)] if self.include_nonprivate else []
            )
            points += [(m, float(e)) for m in self.methods for e in self.method_epsilons(m)]
            for method, eps in points:
                keys = self.grid_keys(method)
                for values in itertools.product(*(self.grid[k] for k in keys)):
                    chosen = dict(zip(keys, values, strict=True))
                    try:
                        config = self._config(method, eps, seed, chosen)
                    except (TypeError, ConfigError) as exc:
                        if not chosen:
                            raise
                        where = ", ".join(f"[grid] {k} = {v!r}" for k, v in chosen.items())
                        raise ConfigError(f"{where} (run {method}): {exc}") from None
                    variant = "-".join(f"{k.rsplit('.', 1)[-1]}{v}" for k, v in chosen.items())
                    label = method if eps is None else f"{method}-eps{eps:g}"
                    label += f"-{variant}" if variant else ""
                    grid.append((f"{label}-seed{seed}", config, variant))
        return grid

    def _config(
        self, method: str, eps: float | None, seed: int, chosen: dict[str, Any]
    ) -> RunConfig:
        base = recipe(method, self.dataset) if self.recipes else Recipe()
        options = {**base.options, **self.method_options.get(method, {})}
        if eps is not None:
            options["epsilon"] = eps
        override = dict(self.per_method.get(method, {}))
        override.pop("epsilons", None)
        train = {**base.train, **self.train, **override.pop("train", {})}
        run = {**base.run, **self.run, **override}
        for key, value in chosen.items():
            head, _, tail = key.partition(".")
            if not tail:
                run[key] = value
            elif head == "train":
                train[tail] = value
            else:
                options[tail] = value
        return RunConfig(
            **run, train=TrainConfig(**train, seed=seed), method=method, method_options=options
        )


def _load_audits(path: Path, spec: SweepSpec) -> SweepSpec:
    """The companion audit sweep named by ``audits`` (a path relative to ``path``), checked
    against ``spec``: it exists and is a valid sweep file naming no companion of its own,
    has another name, the same dataset, canaries, no ``[grid]``, the non-private run when
    ``spec`` has one, and for every method of ``spec`` it runs, at least that method's ε
    grid. A method of ``spec`` it does not run is allowed only when ``spec``'s own runs
    carry canaries (the report then takes that method's ε_LB from them, and says so).
    Every error names the key ``audits`` and both files."""
    where = f"{path}: audits = {spec.audits!r}"
    target = path.parent / str(spec.audits)
    if not target.is_file():
        raise ConfigError(f"{where}: no such sweep file {target} (a path relative to {path})")
    companion = SweepSpec.load(target, follow_audits=False)
    problems = []
    if companion.audits is not None:
        problems.append(f"it names an audit sweep of its own ({companion.audits!r})")
    if companion.name == spec.name:
        problems.append(f"it has this sweep's name {spec.name!r} (the store key)")
    if companion.dataset != spec.dataset:
        problems.append(f"its dataset is {companion.dataset}, not {spec.dataset}")
    if not companion.audited:
        problems.append("its runs carry no canaries (set canaries and audit_canaries)")
    if companion.grid:
        problems.append("it has a [grid] (its ε_LB must be one run per method, ε and seed)")
    if spec.include_nonprivate and not companion.include_nonprivate:
        problems.append("it lacks the non-private run (include_nonprivate = false)")
    for method in spec.methods:
        if method in companion.methods:
            missing = sorted(
                set(map(float, spec.method_epsilons(method)))
                - set(map(float, companion.method_epsilons(method)))
            )
            if missing:
                problems.append(f"it lacks {method} at ε = {', '.join(f'{e:g}' for e in missing)}")
        elif not spec.audited:
            problems.append(
                f"it lacks method {method}, and this sweep's own runs carry no canaries to "
                "audit it with"
            )
    if problems:
        raise ConfigError(f"{where} ({target}): {'; '.join(problems)}")
    return companion


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


#: Types of the shared RunConfig fields that RunConfig itself would not catch in time (a
#: string hflip is truthy; a string crop_padding fails deep in TrainConfig's checks).
_RUN_TYPES = {
    "hflip": (lambda v: isinstance(v, bool), "true or false"),
    "crop_padding": (lambda v: _is_int(v) and v >= 0, "an integer ≥ 0"),
    "model": (lambda v: isinstance(v, str), "a model name"),
    "norm": (lambda v: isinstance(v, str), "batch or group"),
    "dataset": (lambda v: isinstance(v, str), "a dataset name"),
}


def _check_types(path: Path, data: dict[str, Any]) -> None:
    """The sweep file's own keys have the right types, and every ``[method_options.<m>]``
    names a method of the sweep and only options that method takes; each error names the
    key (a misspelt table, e.g. ``[method_options.dp_sgd]``, would otherwise be dropped
    and every run would use the defaults)."""

    def fail(key: str, wanted: str) -> None:
        raise ConfigError(f"{path}: {key} must be {wanted}, got {data_at(key)!r}")

    def data_at(key: str) -> Any:
        value: Any = data
        for part in key.split("."):
            value = value[part]
        return value

    if not isinstance(data["name"], str) or not data["name"].strip():
        fail("name", "a non-empty string")
    if "/" in data["name"] or data["name"] in (".", ".."):
        fail("name", "a name without '/' (it names the sweep's run folder)")
    for key in ("description", "audits"):
        if key in data and not isinstance(data[key], str):
            fail(key, "a string")
    if "include_nonprivate" in data and not isinstance(data["include_nonprivate"], bool):
        fail("include_nonprivate", "true or false")
    methods = data["methods"]
    if not isinstance(methods, list) or not all(isinstance(m, str) for m in methods):
        fail("methods", "a list of method names")
    if len(set(methods)) != len(methods):
        fail("methods", "a list without repeats")
    unknown_methods = [m for m in methods if m not in METHODS]
    if unknown_methods:
        raise ConfigError(
            f"{path}: method must be one of {', '.join(METHODS)}; no such method "
            f"{', '.join(unknown_methods)}"
        )
    if not isinstance(data["epsilons"], list) or not all(map(_is_number, data["epsilons"])):
        fail("epsilons", "a list of numbers")
    seeds = data.get("seeds", [0])
    if not isinstance(seeds, list) or not all(
        isinstance(x, int) and not isinstance(x, bool) for x in seeds
    ):
        fail("seeds", "a list of integers")
    if len(set(seeds)) != len(seeds):
        fail("seeds", "a list without repeats")
    _check_grid(path, data)
    for key in ("train", "method_options", "per_method", "reference", "grid"):
        if key in data and not isinstance(data[key], dict):
            fail(key, "a table")
    for method, override in data.get("per_method", {}).items():
        if not isinstance(override, dict):
            fail(f"per_method.{method}", "a table")
        if "epsilons" in override and (
            not isinstance(override["epsilons"], list)
            or not all(map(_is_number, override["epsilons"]))
        ):
            fail(f"per_method.{method}.epsilons", "a list of numbers")
        if "train" in override and not isinstance(override["train"], dict):
            fail(f"per_method.{method}.train", "a table")
    for prefix, table in [("", data)] + [
        (f"per_method.{m}.", o) for m, o in data.get("per_method", {}).items()
    ]:
        for key, wanted in _RUN_TYPES.items():
            value = table.get(key)
            if value is not None and not wanted[0](value):
                fail(prefix + key, wanted[1])
    for method, options in data.get("method_options", {}).items():
        where = f"[method_options.{method}]"
        if method not in METHODS:
            raise ConfigError(f"{path}: {where} names no method; methods: {', '.join(METHODS)}")
        if method not in [*methods, "none"] or (
            method == "none" and not data.get("include_nonprivate", True)
        ):
            raise ConfigError(
                f"{path}: {where} names no method of the sweep ({', '.join(methods)})"
            )
        if not isinstance(options, dict):
            fail(f"method_options.{method}", "a table")
        if "epsilon" in options:
            raise ConfigError(f"{path}: {where} cannot set epsilon; put ε in epsilons")
        allowed = [name for name in method_parameters(method) if name != "epsilon"]
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise ConfigError(
                f"{path}: {where} does not take {', '.join(unknown)}; method {method} takes "
                f"{', '.join(allowed) or 'no options'}"
            )
    if "recipes" in data and not isinstance(data["recipes"], bool):
        fail("recipes", "true or false")
    # last, so that it never hides the errors above
    use_recipes = data.get("recipes", True)
    for method in [*methods, *(["none"] if data.get("include_nonprivate", True) else [])]:
        has = (
            "epochs" in data.get("train", {})
            or "epochs" in data.get("per_method", {}).get(method, {}).get("train", {})
            or (use_recipes and "epochs" in recipe(method, data["dataset"]).train)
        )
        if not has:
            raise ConfigError(
                f"{path}: [train] must set epochs (an integer ≥ 1): method {method} has no "
                f"recipe for {data['dataset']} that sets it"
                + ("" if use_recipes else " (recipes = false)")
            )


def _check_grid(path: Path, data: dict[str, Any]) -> None:
    """``[grid]``: each key names a TrainConfig field (``train.<field>``), a shared
    RunConfig field or ``<method>.<option>`` of a method of the sweep, and holds a
    non-empty list without repeats; errors name the key and what it may be."""
    grid = data.get("grid")
    if grid is None:
        return
    if not isinstance(grid, dict):
        raise ConfigError(f"{path}: grid must be a table, got {grid!r}")
    train_fields = sorted(f.name for f in fields(TrainConfig) if f.name != "seed")
    shared = sorted({f.name for f in fields(RunConfig)} - set(VARIED))
    methods = [*data.get("methods", []), "none"]
    for key, values in grid.items():
        where = f"[grid] {key}"
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{path}: {where} must be a non-empty list of values, got {values!r}")
        if len({json.dumps(v, sort_keys=True) for v in values}) != len(values):
            raise ConfigError(f"{path}: {where} must be a list without repeats")
        head, _, tail = key.partition(".")
        if not tail:
            if key not in shared:
                raise ConfigError(
                    f"{path}: {where} is no run option; a grid key is train.<field> "
                    f"({', '.join(train_fields)}), one of {', '.join(shared)}, or "
                    "<method>.<option>"
                )
        elif head == "train":
            if tail not in train_fields:
                raise ConfigError(
                    f"{path}: {where}: TrainConfig has no field {tail!r} (seeds go in "
                    f"'seeds'); fields: {', '.join(train_fields)}"
                )
        elif head in methods:
            allowed = [n for n in method_parameters(head) if n != "epsilon"]
            if tail not in allowed:
                raise ConfigError(
                    f"{path}: {where}: method {head} takes {', '.join(allowed) or 'no options'}"
                )
        else:
            raise ConfigError(
                f"{path}: {where} names no method of the sweep ({', '.join(methods)}) and is "
                "not train.<field>"
            )


@dataclass(frozen=True)
class RunOutcome:
    """What a grid point's task sends back to the driver: the run's record and attack
    (None when skipped, with ``busy`` the reason), the Ray node it ran on (None off
    Ray) and, in Ray's "return" mode, the run folder's files as a tar archive."""

    name: str
    config: dict[str, Any]
    run_dir: str
    metrics: Any = None
    attack: Any = None
    busy: str | None = None
    node: str | None = None
    archive: bytes | None = None


def _execute(
    name: str, config: dict[str, Any], run_dir: str, env: dict[str, Any], threads: int | None
) -> RunOutcome:
    """Runs one grid point (in this process, a worker or a Ray task): train, attack,
    report back.

    The run folder stays locked from training to the attack; a grid point another
    process holds (a second copy of the sweep, a ``labeldp train`` into the folder) is
    skipped, not trained twice: metrics and attack come back None, with the reason."""
    if threads:
        torch.set_num_threads(threads)
    from attacks.harness import attack_run

    from .backends import current_node

    run_config = RunConfig.from_dict(config)
    node = current_node()
    try:
        with folder_lock(run_dir):
            metrics = train_run(run_config, run_dir, Environment(**env), resume=True)
            audited = run_config.canaries or run_config.audit_canaries
            attack = attack_run(run_dir) if audited else None
    except FolderLocked as exc:
        busy = f"in use by another process (pid {exc.holder})"
        return RunOutcome(name, config, run_dir, busy=busy, node=node)
    return RunOutcome(name, config, run_dir, metrics, attack, node=node)


def _execute_returning(
    name: str, config: dict[str, Any], run_dir: str, env: dict[str, Any], threads: int | None,
    scratch: str | None, sweep: str,
) -> RunOutcome:  # fmt: skip
    """Ray's "return" mode: runs the grid point in a node-local scratch folder (shared
    results, e.g. PATE's votes, node-local too) and sends the finished folder back."""
    from .backends import pack_folder, scratch_root

    local = scratch_root(scratch) / sweep
    env = {**env, "shared_dir": str(local / "shared")}
    outcome = _execute(name, config, str(local / name), env, threads)
    if outcome.metrics is None:
        return replace(outcome, run_dir=run_dir)
    return replace(outcome, run_dir=run_dir, archive=pack_folder(local / name))


def share_group(config: dict[str, Any]) -> str | None:
    """The key of the runs that share an intermediate result with this one (e.g. PATE's
    teacher votes, the same for every ε of a seed), or None when it shares nothing. Runs
    of one group are scheduled after the first of them, which computes the shared part
    once; the others then find it (see RunContext.shared_folder)."""
    independent = getattr(METHODS[config["method"]], "shared_independent_options", None)
    if independent is None:
        return None
    options = {k: v for k, v in config["method_options"].items() if k not in independent}
    return json.dumps({**config, "method_options": options}, sort_keys=True, default=str)


def _numerics_of(device: str | None, threads: int | None) -> dict[str, Any]:
    """The numerics settings of runs on ``device`` with ``threads`` where this runs (a
    Ray task: the cluster's)."""
    return _expected_numerics(Environment(device=device), threads)


def _expected_numerics(env: Environment, threads: int | None) -> dict[str, Any]:
    """The numerics settings (labeldp.provenance.numerics) the sweep's new runs get."""
    settings = numerics(resolve_device(env.device))
    if threads:
        settings["threads"] = threads
    return settings


def _check_numerics(
    spec: SweepSpec, store: ResultsStore, expected: dict[str, Any], allow_mixed: bool
) -> None:
    """Refuses (unless ``allow_mixed``) to add runs to a sweep whose stored runs were
    made under other numerics settings; warns about stored runs that recorded none."""
    keys = {run_key(c.to_dict()) for _, c in spec.runs()}
    rows = [r for r in store.rows(spec.name) if r["key"] in keys]
    unknown = [r["name"] for r in rows if not r.get("numerics")]
    other = sorted(
        {r["numerics"] for r in rows if r.get("numerics")} - {json.dumps(expected, sort_keys=True)}
    )
    if other and not allow_mixed:
        seen = "; ".join(describe_numerics(json.loads(text)) for text in other)
        raise ConfigError(
            f"sweep {spec.name}: the store holds runs made under other numerics ({seen}) "
            f"than this sweep would use ({describe_numerics(expected)}); results differ "
            "with them. Use the same --workers and --device as before, or pass "
            "--allow-mixed-numerics to mix them"
        )
    if unknown:
        print(
            f"sweep {spec.name}: warning: {len(unknown)} stored runs recorded no numerics "
            f"settings (made before they were recorded); new runs use "
            f"{describe_numerics(expected)}",
            file=sys.stderr,
        )


def matching_runs(spec: SweepSpec, only: str | None = None) -> list[tuple[str, RunConfig]]:
    """(name, config) of the grid points whose names match the shell-style pattern
    ``only`` (e.g. ``"pate-fm-*-seed0"``), in grid order; every point when None. May be
    empty (:func:`run_sweep` refuses that; ``labeldp reproduce`` skips such a sweep)."""
    grid = spec.runs()
    if only is None:
        return grid
    return [(n, c) for n, c in grid if fnmatch.fnmatchcase(n, only)]


def run_sweep(
    spec: SweepSpec,
    store: ResultsStore,
    runs_root: str | Path = "runs",
    env: Environment | None = None,
    backend: LocalBackend | RayBackend | None = None,
    only: str | None = None,
    allow_mixed_numerics: bool = False,
) -> int:
    """Runs every grid point of ``spec`` not yet in ``store``; returns how many it ran.

    backend: where the runs execute (labeldp.backends): LocalBackend(workers) (the
    default, one at a time in this process; with several workers each gets an equal share
    of the CPU threads) or RayBackend. Either way this process alone writes the store, a
    row per finished run, as soon as it finishes. only: a shell-style pattern over run
    names (e.g. ``"pate-fm-*-seed0"``): run just the matching points (an error when none
    matches). Progress shows as one bar over the grid and a line per finished run.

    Runs sharing an intermediate result (:func:`share_group`, e.g. PATE-FM's teachers
    for every ε of a seed) start after the first of their group has finished, so the
    shared part is computed once whatever the parallelism.

    The thread count, torch version and device change a result's floating-point
    arithmetic (see labeldp.provenance.numerics): a sweep whose stored runs were made under
    other settings than its new runs would get is refused unless
    ``allow_mixed_numerics``. Grid points another process is training are skipped (a
    line says so); the count returned excludes them."""
    from .backends import drive, unpack_folder

    backend = backend if backend is not None else LocalBackend()
    if not isinstance(backend, (LocalBackend, RayBackend)):
        raise ConfigError(f"backend must be a LocalBackend or a RayBackend, got {backend!r}")
    env = env or Environment()
    # absolute paths: Ray tasks do not run in this directory
    folder = Path(runs_root).resolve() / spec.name
    inner = asdict(env) | {"progress": env.progress and not backend.parallel}
    if inner["data_dir"] is not None:
        inner["data_dir"] = str(Path(inner["data_dir"]).resolve())
    if inner["shared_dir"] is None:  # e.g. PATE's teachers, trained once per seed
        inner["shared_dir"] = str(folder / "shared")
    done = store.finished_keys(spec.name)
    grid = matching_runs(spec, only)
    if not grid:
        names = ", ".join(n for n, _ in spec.runs())
        raise ConfigError(f"only: {only!r} matches no run of {spec.name}; runs: {names}")
    todo = [(n, c.to_dict()) for n, c in grid if run_key(c.to_dict()) not in done]
    threads = backend.threads
    ray = isinstance(backend, RayBackend)
    executor = backend.executor(env.device) if todo else None
    if not todo:
        expected = {}
    elif ray:  # what the cluster's runs will record (their device may not be this machine's)
        expected = executor.submit(_numerics_of, env.device, threads).result()
    else:
        expected = _expected_numerics(env, threads)
    if todo:
        try:
            _check_numerics(spec, store, expected, allow_mixed_numerics)
        except ConfigError:
            executor.shutdown()
            raise
    skipped: list[str] = []
    refused: list[str] = []
    bar = tqdm(
        total=len(grid),
        initial=len(grid) - len(todo),
        desc=f"sweep {spec.name}",
        unit="run",
        disable=not env.progress,
        dynamic_ncols=True,
    )

    def finish(outcome: RunOutcome) -> None:
        name, config, run_dir, metrics, attack = (
            outcome.name, outcome.config, outcome.run_dir, outcome.metrics, outcome.attack,
        )  # fmt: skip
        if outcome.busy is not None:
            skipped.append(name)
            bar.write(f"{name}: skipped, {run_dir} is {outcome.busy}; it is not trained twice")
            return
        made = metrics.numerics
        if made and made != expected and not allow_mixed_numerics:
            # e.g. a finished run folder left by `labeldp train` under other settings
            refused.append(name)
            bar.write(
                f"{name}: not stored: {run_dir} was made under other numerics "
                f"({describe_numerics(made)}, here {describe_numerics(expected)}); "
                "pass --allow-mixed-numerics to store it"
            )
            return
        if outcome.archive is not None:  # Ray's "return" mode: the folder comes back first
            unpack_folder(outcome.archive, run_dir)
        # When the run itself finished (its provenance date), not when it was stored.
        stamp = metrics.date or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        store.record(spec.name, name, config, run_dir, metrics, attack, stamp)
        bar.update(1)
        bound = (
            ""
            if not attack or not attack.memorization
            else f", ε_LB {format_epsilon(attack.memorization['epsilon_lb'])}"
        )
        bar.write(
            f"{name}: {metrics.evaluation_split} accuracy "
            f"{metrics.evaluation_accuracy:.4f}, "
            f"ε = {format_epsilon(metrics.epsilon)}{bound}"
        )

    if ray and backend.run_folders == "return":
        task, extra = _execute_returning, (backend.scratch_dir, spec.name)
    else:
        task, extra = _execute, ()
    if todo:
        drive(
            executor,
            todo,
            task,
            lambda item: (item[0], item[1], str(folder / item[0]), inner, threads, *extra),
            finish,
            capacity=backend.capacity(len(todo)),
            group=lambda item: share_group(item[1]),
        )
    bar.close()
    new = len(todo) - len(skipped) - len(refused)
    if env.progress:
        stored = len({run_key(c.to_dict()) for _, c in grid} & store.finished_keys(spec.name))
        print(
            f"sweep {spec.name}: {stored} of {len(grid)} runs in the store ({new} new)",
            file=sys.stderr,
        )
    if skipped:
        print(
            f"sweep {spec.name}: {len(skipped)} grid points skipped, in use by another "
            f"process: {', '.join(skipped)}",
            file=sys.stderr,
        )
    return new
