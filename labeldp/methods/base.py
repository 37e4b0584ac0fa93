"""What a training method is: a mechanism (or none) + the training core + the ledger.

A method receives a :class:`RunContext` (the data, a model factory, the training
hyper-parameters, where to checkpoint) and returns the trained model's
:class:`~labeldp.train.FitResult` together with the :class:`PrivacyLedger` that says what
the labels cost. Methods never parse command lines: their constructor takes validated
hyper-parameters, so the same object serves the CLI, sweeps and notebooks.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ..augment import Normalize
from ..data import DeviceDataset
from ..errors import ConfigError
from ..io import atomic_write, atomic_write_json
from ..options import MethodOptions, build_options
from ..privacy import PrivacyLedger
from ..run_folder import diagnostics_dir
from ..seeding import Stream, derive_seed
from ..train import FitResult, TargetFn, TrainConfig, Trainer, accuracy, predict_logits
from ..train.loop import Augmentation
from ..train.sampling import BatchSampler
from ..train.steps import GradientStep


@dataclass
class RunContext:
    """Everything a method needs to train.

    train, test: the splits, on the training device (``train`` already restricted to
        ``--train-size`` examples when asked).
    build_model: returns a freshly initialised model (seeded by the run).
    build_named_model: builds the model called ``name`` (None: the run's model) for this
        dataset, with torch's current seed (the caller seeds it), e.g. PATE's teachers.
    config: the core loop's hyper-parameters.
    normalize, augment: batch preprocessing for this dataset.
    run_dir: the run's folder for checkpoints, or None to keep nothing on disk.
    shared_dir: a folder shared by related runs (e.g. one sweep's) for results that do not
        depend on the privacy parameters, each under a key that hashes everything they do
        depend on (see :meth:`shared_folder`); None: nothing is shared.
    resume: continue from the checkpoints in ``run_dir`` where present.
    fingerprint: JSON-able identity of the run, stored in checkpoints.
    noise_key: the run's :func:`~labeldp.seeding.config_key`; every privacy-noise
        stream (and the batch order, which holds DP-SGD's Poisson coins) is keyed by it,
        so runs that differ in any option draw independent noise.
    canary_indices: train-split positions of every planted canary (memorization and
        audit), for methods that must make sure the canaries reach training (PATE's
        query pool); None without canaries.
    true_labels: the training split's labels before any canary was planted, for
        diagnostics only (statistics outside the guarantee, such as the accuracy of
        PATE's answers): a method must never train on them or release anything computed
        from them; None: ``train.labels`` (no canaries).
    """

    train: DeviceDataset
    test: DeviceDataset
    build_model: Callable[[], nn.Module]
    config: TrainConfig
    normalize: Normalize
    augment: Augmentation | None
    run_dir: Path | None = None
    shared_dir: Path | None = None
    resume: bool = False
    progress: bool = True
    build_named_model: Callable[[str | None], nn.Module] | None = None
    checkpoint_every: int = 1
    fingerprint: dict[str, Any] = field(default_factory=dict)
    noise_key: tuple[int, ...] = ()
    canary_indices: torch.Tensor | None = None
    true_labels: torch.Tensor | None = None

    @property
    def diagnostic_labels(self) -> torch.Tensor:
        """The labels diagnostics compare against: :attr:`true_labels` when canaries were
        planted, else the training labels (never to be trained on)."""
        return self.true_labels if self.true_labels is not None else self.train.labels

    def noise_seed(self, stream: Stream, *index: int) -> int:
        """The seed of privacy-noise ``stream`` (and e.g. a stage ``index``): the run's
        seed keyed by its configuration (:attr:`noise_key`)."""
        return derive_seed(self.config.seed, stream, *index, key=self.noise_key)

    def generator(self, stream: Stream, *index: int) -> torch.Generator:
        """A generator on the training device for privacy-noise ``stream`` (and e.g. a
        stage ``index``), seeded by :meth:`noise_seed`; see :mod:`labeldp.seeding`."""
        return torch.Generator(device=self.train.device).manual_seed(
            self.noise_seed(stream, *index)
        )

    def diagnostics(self) -> Path | None:
        """The run's ``diagnostics/`` folder (not covered by the guarantee; see
        :mod:`labeldp.run_folder`), or None without a run folder."""
        return diagnostics_dir(self.run_dir) if self.run_dir is not None else None

    def shared_folder(self, kind: str, method_identity: dict[str, Any]) -> Path | None:
        """The folder for a shareable intermediate result of ``kind`` (e.g. "pate-votes"),
        fully determined by the run's fingerprint without its method options, by
        ``method_identity`` (the method options it depends on, JSON-able) and by the
        device type: ``<shared_dir>/diagnostics/<kind>/<hash>``, with an ``identity.json``.
        It is the run's ``diagnostics/`` folder when nothing is shared (no shared_dir, or
        no fingerprint to key on), and None without either. Such results are computed
        from the raw private labels (e.g. teacher votes): not covered by the guarantee.

        Sharing is sound only for results that the run would recompute identically
        (seeded, no private noise): a run that finds one uses it instead of redoing it."""
        if self.shared_dir is None or not self.fingerprint:
            return self.diagnostics()
        run = {k: v for k, v in self.fingerprint.items() if k != "method_options"}
        full = {"kind": kind, "device": self.train.device.type, "run": run,
                "method": method_identity}  # fmt: skip
        text = json.dumps(full, sort_keys=True, default=str)
        folder = (
            diagnostics_dir(self.shared_dir) / kind / hashlib.sha256(text.encode()).hexdigest()[:20]
        )
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / "identity.json").exists():
            atomic_write_json(folder / "identity.json", full)
        return folder

    def privatized(self, name: str, draw: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The output of a label mechanism, drawn exactly once per run.

        The first call draws and stores it in ``<run_dir>/<name>.noisy.pt`` (atomically);
        a resumed run loads it instead of drawing again. Drawing twice would compose two
        releases of the same labels and silently double the privacy cost, and with
        secure (unseeded) noise it would also change the training targets."""
        if self.run_dir is None:
            return draw()
        path = self.run_dir / f"{name}.noisy.pt"
        if path.exists():
            if not self.resume:
                raise RuntimeError(f"{path} exists in a run that is not resumed")
            return torch.load(path, map_location=self.train.device, weights_only=True)
        value = draw()
        atomic_write(path, lambda handle: torch.save(value.cpu(), handle))
        return value

    def fit(
        self,
        targets: TargetFn,
        *,
        name: str = "train",
        subset: torch.Tensor | None = None,
        model: nn.Module | None = None,
        step: GradientStep | None = None,
        sampler: BatchSampler | None = None,
        config: TrainConfig | None = None,
    ) -> FitResult:
        """Trains ``model`` (a fresh one by default) towards ``targets`` with the core
        loop, checkpointing as ``<run_dir>/<name>.ckpt``.

        subset: indices into the train split to train on (default all). ``targets`` is
            then indexed by position in ``subset`` (0..len(subset)−1).
        A multi-stage method calls this once per stage with distinct names."""
        images = self.train.images if subset is None else self.train.images[subset]
        trainer = Trainer(
            model if model is not None else self.build_model(),
            images,
            targets,
            config or self.config,
            normalize=self.normalize,
            augment=self.augment,
            test_images=self.test.images,
            test_labels=self.test.labels,
            step=step,
            sampler=sampler,
            checkpoint_path=self.run_dir / f"{name}.ckpt" if self.run_dir is not None else None,
            checkpoint_every=self.checkpoint_every,
            fingerprint={**self.fingerprint, "stage": name},
            stream_key=self.noise_key,
            progress=self.progress,
            description=name,
        )
        return trainer.fit(resume=self.resume)


@dataclass
class MethodResult:
    """What a method returns. diagnostics: JSON-able statistics computed from the raw
    private labels (e.g. the accuracy of PATE's answers against the true labels); they
    are not covered by the guarantee and go under ``metrics.json["diagnostics"]``."""

    fit: FitResult
    ledger: PrivacyLedger
    diagnostics: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RunCheck:
    """What a method's :meth:`Method.check` sees before the run folder is written.

    num_examples: training examples N (after ``--train-size``). num_classes: K.
    config: the core loop's hyper-parameters. build_model: a fresh model of the run (it
    seeds torch's global generator: call it under ``torch.random.fork_rng`` so that the
    run's draws stay as they were). canaries: planted canaries, both kinds together.
    build_named_model: builds the model called ``name`` (None: the run's) for this dataset
    and norm, with torch's current seed (e.g. PATE's teachers); None when not given."""

    num_examples: int
    num_classes: int
    config: TrainConfig
    build_model: Callable[[], nn.Module]
    canaries: int = 0
    build_named_model: Callable[[str | None], nn.Module] | None = None


@dataclass(frozen=True)
class NoOptions(MethodOptions):
    """The options of a method that takes none."""


class Method:
    """Base class of training methods. Subclasses set ``name`` (the CLI name) and
    ``Options`` (their hyper-parameters: a frozen :class:`~labeldp.options.MethodOptions`
    dataclass whose fields declare default, allowed values, help and CLI flag once; see
    :mod:`labeldp.options`), and implement ``run(ctx)``; they may override the declared
    capabilities below (``tests/test_capabilities.py`` refuses any other class-level
    attribute, so a misspelt capability fails the suite).

    A method is built from its options by keyword (the first, ε, may also be given by
    position): ``RandomizedResponseMethod(1.0, learning="forward")``. The checked options
    are ``self.opts``, and each is also an attribute (``self.epsilon``); a subclass that
    derives more state overrides ``__init__`` and calls ``super().__init__`` first.

    epsilon_meaning: what the method's ε protects, when it is not the plain label-DP ε
    of "replace one label" (the report prints it under the tables); None by default.
    shared_independent_options: the method options that the intermediate results it
    shares between runs (:meth:`RunContext.shared_folder`) do not depend on; runs differing
    only in those share the results, and a sweep schedules them after the first of them
    (:func:`labeldp.sweep.share_group`); None (the default): the method shares nothing.
    check(run): refuses (ConfigError) a run the method cannot carry out, before anything
    is written (see :func:`check_method`); the default refuses nothing.
    """

    name: ClassVar[str]
    Options: ClassVar[type[MethodOptions]] = NoOptions
    epsilon_meaning: ClassVar[str | None] = None
    shared_independent_options: ClassVar[tuple[str, ...] | None] = None

    def __init__(self, *args: Any, **options: Any) -> None:
        self.opts = build_options(self.Options, args, options, self.name)
        for key, value in self.opts.to_dict().items():
            setattr(self, key, value)

    def options(self) -> dict[str, Any]:
        """The hyper-parameters as config.json records them; ``build_method(name,
        options())`` rebuilds an equal method."""
        return self.opts.to_dict()

    def run(self, ctx: RunContext) -> MethodResult:
        raise NotImplementedError(f"{type(self).__name__} must implement run()")

    def check(self, run: RunCheck) -> None:
        """Refuses a run this method cannot carry out; the default accepts every run."""


def check_method(method: Method, run: RunCheck) -> None:
    """Every check a run must pass before its folder is written: the batch size against
    the data, then the method's own ``check`` (none: nothing more to check). A failure
    is a ConfigError, and the corrected command may then use the same folder."""
    n, batch = run.num_examples, run.config.batch_size
    if batch > n:
        raise ConfigError(
            f"--batch-size (batch_size) must be in 1..{n}, the number of training examples, "
            f"got {batch}"
        )
    method.check(run)


def untrained(ctx: RunContext) -> FitResult:
    """The result of not training: a freshly initialised model and its test accuracy (for
    a method that released no labels to learn from, e.g. PATE answering no query)."""
    model = ctx.build_model().to(ctx.test.images.device)
    start = time.perf_counter()
    logits = predict_logits(model, ctx.test.images, ctx.normalize)
    return FitResult(
        history=[],
        test_accuracy=accuracy(logits, ctx.test.labels),
        train_seconds=0.0,
        eval_seconds=time.perf_counter() - start,
        eval_model=model.eval(),
    )
