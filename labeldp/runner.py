"""One training run, from a configuration to a run folder.

A run folder holds:

- ``config.json``: the :class:`RunConfig` (what was asked for) and where it ran;
- ``<stage>.ckpt``: checkpoints while the run is unfinished (removed at the end);
- ``model.pt``: the final evaluation model's weights;
- ``<name>.noisy.pt``: what a label mechanism released, drawn once;
- ``diagnostics/``: what the guarantee does not cover — ``canaries.pt`` (with canaries)
  and ``outputs.pt`` (what the attacks read, with true labels), raw teacher votes, ...
  (:mod:`labeldp.run_folder` is the one place that says what is covered);
- ``metrics.json``: test accuracy, ε, δ, the privacy ledger, timings, per-epoch history
  and provenance (package version, git commit, machine, date); statistics against the
  true labels only under its ``diagnostics`` key. It is the JSON form of a
  :class:`~labeldp.records.RunRecord` (∞ as "Infinity": see labeldp.records).

``metrics.json`` is written last and atomically, so its presence means "finished". A
finished run is never overwritten; an unfinished one is continued with ``resume=True``.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from attacks.canaries import plant as plant_canaries
from attacks.outputs import collect_outputs

from .augment import Normalize, WeakAugment
from .data import DATASETS, DeviceDataset, hold_out, load_splits, random_subset
from .data.sources import find_file, locate
from .errors import ConfigError, DataError, check_int
from .io import atomic_write, atomic_write_json, read_json
from .locking import folder_lock
from .methods import build_method
from .methods.base import RunCheck, RunContext, check_method
from .models import NORM_KINDS, build_model, model_builder
from .provenance import cpu_numerics, numerics, provenance
from .records import RunRecord
from .run_folder import diagnostics_dir
from .seeding import Stream, config_key, derive_seed
from .train import TrainConfig, device_description, resolve_device

#: What every ledger entry of a run with seeded noise says (item 3 of the audit): the run
#: seed and configuration regenerate the noise, so the guarantee needs them secret.
SEEDED_CONDITION = (
    "seeded noise: the guarantee holds only while the run seed is secret (config.json "
    "records it; seed and configuration regenerate every noise draw). For real private "
    "data use --secure-noise"
)

DEFAULT_MODEL = {
    "fashion-mnist": "cnn",
    "mnist": "cnn",
    "cifar10": "resnet18",
    "cifar100": "resnet18",
}


@dataclass(frozen=True)
class RunConfig:
    """What one run trains: everything that can change its result.

    dataset: a name from :data:`labeldp.data.DATASETS`.
    method: a name from :data:`labeldp.methods.METHODS`; method_options its
        hyper-parameters.
    model: a name from :data:`labeldp.models.MODELS`; None picks the dataset's default
        (cnn for 28x28 data, resnet18 for CIFAR).
    norm: "batch" or "group" normalization layers.
    train_size: train on a seeded random subset of this many examples (1..N), or None
        for the whole training split. The subset depends on ``seed`` only, never labels.
    crop_padding: random-crop translation in pixels (≥ 0); None picks 1 for 28x28
        images (92.7 % against 92.2 % with 2 for the 8-epoch Fashion-MNIST baseline) and 4
        for 32x32. hflip: random horizontal flips; None follows the dataset.
    train: the core loop's hyper-parameters (epochs, lr, seed, ...).
    validation_size: hold out a validation split of this many examples (1..N−1), carved
        from the training split before ``train_size`` applies and never trained on; the
        run is then evaluated on it instead of the test split (``validation_accuracy`` in
        metrics.json, ``test_accuracy`` null), so hyper-parameters are chosen without
        seeing the test set. The split is the same for every run and seed of a dataset
        (a fixed seed, never labels). Its true labels are used only to score the run (a
        tuning statistic, outside the guarantee, as in the label-DP literature's tuning
        on public benchmarks); None: evaluate on the test split.
    canaries: memorization canaries planted among the training labels (≥ 0); as many
        control test images are recorded too. audit_canaries: one-run audit canaries
        (≥ 0). Both replace labels before the method sees any (see attacks.canaries).
    """

    dataset: str
    train: TrainConfig
    method: str = "none"
    method_options: dict[str, Any] = field(default_factory=dict)
    model: str | None = None
    norm: str = "batch"
    train_size: int | None = None
    validation_size: int | None = None
    crop_padding: int | None = None
    hflip: bool | None = None
    canaries: int = 0
    audit_canaries: int = 0

    def __post_init__(self) -> None:
        for name in ("canaries", "audit_canaries"):
            check_int(name, getattr(self, name), 0)
        if self.dataset not in DATASETS:
            raise ConfigError(f"dataset must be one of {', '.join(DATASETS)}, got {self.dataset!r}")
        if self.train_size is not None and (
            isinstance(self.train_size, bool)
            or not isinstance(self.train_size, int)
            or self.train_size < 1
        ):
            raise ConfigError(f"train_size must be an integer ≥ 1 or None, got {self.train_size!r}")
        if self.validation_size is not None and (
            isinstance(self.validation_size, bool)
            or not isinstance(self.validation_size, int)
            or self.validation_size < 1
        ):
            raise ConfigError(
                f"validation_size must be an integer ≥ 1 or None, got {self.validation_size!r}"
            )
        if self.crop_padding is not None and self.crop_padding < 0:
            raise ConfigError(f"crop_padding must be ≥ 0 pixels, got {self.crop_padding}")
        if self.model is not None:
            model_builder(self.model)  # validates the name
        if self.norm not in NORM_KINDS:
            raise ConfigError(f"norm must be one of {', '.join(NORM_KINDS)}, got {self.norm!r}")
        build_method(self.method, self.method_options)  # validates name and options

    @property
    def model_name(self) -> str:
        return self.model or DEFAULT_MODEL[self.dataset]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["model"] = self.model_name
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown run options: {', '.join(sorted(unknown))}")
        values = dict(data)
        values["train"] = TrainConfig(**values["train"])
        return cls(**values)


@dataclass
class Environment:
    """Where a run happens; none of it should change the result beyond float noise.

    data_dir: where to look for datasets first (see labeldp.data); download: whether a
    missing dataset may be downloaded; device: "auto", "cpu", "cuda", "cuda:N".
    shared_dir: a folder shared by related runs (a sweep's) for intermediate results that
    do not depend on a run's privacy parameters, such as PATE's teacher votes, keyed by
    everything they do depend on (see RunContext.shared_dir); None: nothing is shared."""

    data_dir: str | None = None
    download: bool = True
    device: str | None = "auto"
    progress: bool = True
    checkpoint_every: int = 1
    shared_dir: str | None = None


def prepare_data(config: RunConfig, env: Environment) -> tuple[DeviceDataset, DeviceDataset]:
    """Loads the splits on the training device and applies ``validation_size`` and
    ``train_size``; returns (train, evaluation split): the test split, or the validation
    split carved from the training split when ``validation_size`` is set."""
    device = resolve_device(env.device)
    train, test = load_splits(
        config.dataset, data_dir=env.data_dir, download=env.download, device=device
    )
    if config.validation_size is not None:
        train, test = hold_out(train, config.validation_size, config.dataset)
    if config.train_size is not None:
        if config.train_size > len(train):
            raise ConfigError(
                f"train_size must be in 1..{len(train)} for {config.dataset}, "
                f"got {config.train_size}"
            )
        seed = derive_seed(config.train.seed, Stream.TRAIN_SUBSET)
        subset = random_subset(len(train), config.train_size, seed)
        train = train.subset(subset.to(train.device))
    return train, test


def train_run(
    config: RunConfig, out: str | Path | None, env: Environment | None = None, resume: bool = False
) -> RunRecord:
    """Runs ``config`` and returns its record (metrics.json's content); with ``out``,
    records the run there.

    A folder that already holds a finished run is left alone: with ``resume`` its record
    is returned, without it that is an error. A folder with an unfinished run is
    continued from its checkpoints with ``resume``, and refused without it. The folder is
    locked for the whole run: a second process training it at the same time is refused
    (:class:`labeldp.locking.FolderLocked`) before it reads or writes anything there.
    """
    env = env or Environment()
    run_dir = Path(out) if out is not None else None
    if run_dir is None:
        return _train_run(config, None, env, resume)
    with folder_lock(run_dir):
        finished = _check_run_dir(run_dir, config, resume)
        if finished is not None:
            return finished
        return _train_run(config, run_dir, env, resume)


def _train_run(
    config: RunConfig, run_dir: Path | None, env: Environment, resume: bool
) -> RunRecord:
    """train_run's work, once the run folder (if any) is locked and checked."""
    started = time.perf_counter()
    cpu_numerics()
    device = resolve_device(env.device)
    train, test = prepare_data(config, env)
    info = train.info
    true_labels = train.labels
    canaries = None
    if config.canaries + config.audit_canaries > len(train) - 1:
        raise ConfigError(
            f"canaries + audit_canaries (--canaries, --audit-canaries) must be at most "
            f"{len(train) - 1}, the {len(train)} training examples less one (label inference "
            f"needs an example that is not a canary), got {config.canaries} + "
            f"{config.audit_canaries}"
        )
    if config.canaries or config.audit_canaries:
        canaries = plant_canaries(
            true_labels,
            info.num_classes,
            config.canaries,
            config.audit_canaries,
            len(test),
            torch.Generator().manual_seed(derive_seed(config.train.seed, Stream.CANARIES)),
        )
        train = DeviceDataset(train.images, canaries.training_labels(true_labels), info)
    method = build_method(config.method, config.method_options)
    fingerprint = config.to_dict()

    def named_model(name: str | None = None) -> torch.nn.Module:
        return build_model(
            name or config.model_name,
            num_classes=info.num_classes,
            in_channels=info.channels,
            image_size=info.image_size,
            norm=config.norm,
        )

    def new_model() -> torch.nn.Module:
        torch.manual_seed(derive_seed(config.train.seed, Stream.MODEL_INIT))
        return named_model()

    # Everything the method can check is checked before config.json exists, so that a
    # refused command, once corrected, may use the same folder.
    check_method(
        method,
        RunCheck(
            num_examples=len(train),
            num_classes=info.num_classes,
            config=config.train,
            build_model=new_model,
            canaries=config.canaries + config.audit_canaries,
            build_named_model=named_model,
        ),
    )
    noise_key = config_key(fingerprint)
    if run_dir is not None:
        recorded = run_dir / "config.json"
        if resume and recorded.exists():  # a resumed run keeps the noise key it started with
            old = read_json(recorded, "delete the run folder to start afresh").get("noise_key")
            noise_key = tuple(old) if old else noise_key
        atomic_write_json(
            recorded,
            {"run": fingerprint, "environment": asdict(env), "noise_key": list(noise_key)},
        )
        if canaries is not None:
            canaries.save(diagnostics_dir(run_dir) / "canaries.pt")

    crop = (
        config.crop_padding
        if config.crop_padding is not None
        else (1 if info.image_size <= 28 else 4)
    )
    hflip = info.hflip if config.hflip is None else config.hflip
    ctx = RunContext(
        train=train,
        test=test,
        build_model=new_model,
        build_named_model=named_model,
        config=config.train,
        normalize=Normalize(info.mean, info.std),
        augment=WeakAugment(crop_padding=crop, hflip=hflip),
        run_dir=run_dir,
        shared_dir=Path(env.shared_dir) if env.shared_dir is not None else None,
        resume=resume,
        progress=env.progress,
        checkpoint_every=env.checkpoint_every,
        fingerprint=fingerprint,
        noise_key=noise_key,
        canary_indices=torch.cat([canaries.indices, canaries.audit_indices])
        if canaries is not None
        else None,
        true_labels=true_labels if canaries is not None else None,
    )
    result = method.run(ctx)
    secure = bool(method.options().get("secure_noise", False))
    if result.ledger.is_private and not secure:
        result.ledger = result.ledger.with_condition(SEEDED_CONDITION)
    sample_generator = torch.Generator().manual_seed(
        derive_seed(config.train.seed, Stream.OUTPUT_SAMPLE)
    )
    outputs = collect_outputs(
        result.fit.eval_model,
        train.images,
        true_labels,
        test.images,
        test.labels,
        ctx.normalize,
        canaries,
        sample_generator,
    )
    ledger = result.ledger.to_dict()
    record = RunRecord(
        dataset=config.dataset,
        method=config.method,
        method_options=method.options(),
        method_details=result.fit.extra,
        model=config.model_name,
        train_size=len(train),
        evaluation_split="test" if config.validation_size is None else "validation",
        test_accuracy=result.fit.test_accuracy if config.validation_size is None else None,
        validation_accuracy=None if config.validation_size is None else result.fit.test_accuracy,
        epsilon=result.ledger.epsilon,
        delta=result.ledger.delta,
        ledger=ledger,
        train_seconds=result.fit.train_seconds,
        eval_seconds=result.fit.eval_seconds,
        session_wall_seconds=time.perf_counter() - started,
        resumed_from_epoch=result.fit.resumed_from_epoch,
        device=device_description(device),
        numerics=numerics(device),
        history=tuple(result.fit.history),
        # the data files' MD5s hash the raw training labels: a diagnostic, not a release
        diagnostics={**result.diagnostics, "data": data_record(config.dataset, env)},
        # A run whose training diverged is recorded as such, its non-finite numbers as
        # null (∞ as "Infinity"). So is one that ended on the constant-prediction plateau
        # (labeldp.train.loop.collapsed).
        outcome="diverged"
        if result.fit.diverged
        else "collapsed"
        if result.fit.collapsed
        else "finished",
        **provenance(),
    )
    metrics = record.to_json()
    record = RunRecord.from_json(metrics)  # as a resumed call reads it back
    if run_dir is not None:
        weights = result.fit.eval_model.state_dict()
        atomic_write(run_dir / "model.pt", lambda handle: torch.save(weights, handle))
        atomic_write(
            diagnostics_dir(run_dir) / "outputs.pt", lambda handle: torch.save(outputs, handle)
        )
        atomic_write_json(run_dir / "metrics.json", metrics)
        for checkpoint in run_dir.glob("*.ckpt"):
            checkpoint.unlink()
    return record


def _check_run_dir(run_dir: Path, config: RunConfig, resume: bool) -> RunRecord | None:
    """Enforces the never-overwrite rules; returns the record of a finished run that
    ``resume`` asks for, else None."""
    metrics_path, config_path = run_dir / "metrics.json", run_dir / "config.json"
    if config_path.exists():
        recorded = read_json(
            config_path,
            f"it records the run's options; delete {run_dir} to start afresh, or choose "
            "another --out",
        )["run"]
        try:  # options added since the run was made take their defaults
            recorded = RunConfig.from_dict(recorded).to_dict()
        except (ConfigError, TypeError, KeyError):
            pass
        if recorded != config.to_dict():
            raise ConfigError(
                f"{run_dir} holds a run with other options; choose another --out "
                "(or delete the folder)"
            )
    if metrics_path.exists():
        if not resume:
            raise ConfigError(
                f"{run_dir} already holds a finished run; choose another --out (or delete it)"
            )
        return read_run_record(
            metrics_path,
            f"the finished run's record is lost; delete {run_dir} and train again, or choose "
            "another --out",
        )
    if config_path.exists() and not resume:
        raise ConfigError(
            f"{run_dir} holds an unfinished run; add --resume to continue it, "
            "or choose another --out"
        )
    return None


def read_run_record(path: str | Path, what_to_do: str) -> RunRecord:
    """The :class:`RunRecord` of the metrics.json at ``path`` (of any version); a file
    that is not valid JSON or not a run record is a DataError naming it and ``what_to_do``."""
    data = read_json(path, what_to_do)
    try:
        return RunRecord.from_json(data)
    except (DataError, TypeError, ValueError) as exc:
        raise DataError(f"{path} is not a run record ({exc}); {what_to_do}") from None


def data_record(dataset: str, env: Environment) -> dict[str, Any]:
    """Where the run's data came from: the folder used and each file's MD5 (of the bytes
    on disk; a re-compressed copy of the official data has another MD5 than the download)."""
    info = DATASETS[dataset]
    folder = locate(info, env.data_dir, download=False)
    files: dict[str, str] = {}
    for name in info.files:
        path = find_file(info, folder, name)
        if path is None:
            continue
        digest = hashlib.md5()
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        files[path.name] = digest.hexdigest()
    return {"folder": str(folder.resolve()), "md5": files}


def format_epsilon(epsilon: float | None) -> str:
    """ε for humans: "∞" for a non-private run (ε = math.inf; None in older callers)."""
    return "∞" if epsilon is None or math.isinf(epsilon) else f"{epsilon:g}"
