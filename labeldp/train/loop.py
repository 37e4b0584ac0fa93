"""The training core: one loop for hard labels or soft targets, on CPU or CUDA.

The data stay on the training device as uint8 tensors; each step gathers a batch by
index, augments and normalizes it in one batched call, and hands it to the gradient step.
There is no DataLoader and no per-example Python. Randomness (batch order, augmentation,
anything drawn from torch's global generator) is seeded afresh at the start of every
epoch from (seed, epoch), so a run resumed from the checkpoint of epoch e continues
exactly as the uninterrupted run would have.

The steps of an epoch are the training core's loop body,
:func:`~labeldp.train.core.train_steps` (shared with the FixMatch ensemble); the optimizer
and schedule come from ``TrainConfig.sgd``, the checkpoints from
:mod:`labeldp.train.checkpoint`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..augment import Normalize
from ..errors import ConfigError
from ..records import EpochRecord
from ..seeding import Stream, derive_seed
from .checkpoint import CHECKPOINT_FORMAT, check_fingerprint, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .core import Optimization, plain_inputs, train_steps
from .device import autocast_for
from .ema import WeightAverage
from .sampling import BatchSampler, ShuffledBatches
from .steps import BackpropStep, GradientStep, StepOutput
from .targets import HardLabels, TargetFn, as_targets, target_classes

Augmentation = Callable[[torch.Tensor, torch.Generator], torch.Tensor]

_MISMATCH = (
    "the checkpoint was written by a run with a different configuration; "
    "resume with the same options, or start afresh in another --out folder"
)


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    images: torch.Tensor,
    normalize: Normalize,
    batch_size: int = 1000,
    autocast: Callable = None,  # type: ignore[assignment]
) -> torch.Tensor:
    """The model's logits (float32, (N, K)) on uint8 ``images`` (N, C, H, W), in eval mode,
    in batches of ``batch_size``. The model's train/eval mode is restored afterwards."""
    was_training = model.training
    model.eval()
    autocast = autocast or autocast_for(images.device, "fp32")
    outputs = []
    for start in range(0, images.shape[0], batch_size):
        with autocast():
            batch = normalize(images[start : start + batch_size])
            outputs.append(model(batch.contiguous(memory_format=torch.channels_last)).float())
    model.train(was_training)
    return torch.cat(outputs)


#: A model is "collapsed" (the constant-prediction plateau that heavy label noise with too
#: large a learning rate produces) when one class takes more than this share of its
#: predictions on the evaluation split; with K ≥ 3 classes only (see :func:`collapsed`).
COLLAPSE_SHARE = 0.5


def top_class_share(logits: torch.Tensor) -> float:
    """The share (0–1) of rows predicted as the most-predicted class."""
    counts = torch.bincount(logits.argmax(dim=1), minlength=logits.shape[1])
    return (counts.max().float() / max(logits.shape[0], 1)).item()


def collapsed(share: float | None, num_classes: int) -> bool:
    """Whether a model whose most-predicted class takes ``share`` of its predictions sits on
    the constant-prediction plateau: share > :data:`COLLAPSE_SHARE` with K ≥ 3 (a
    heuristic for roughly balanced evaluation splits such as Fashion-MNIST's or CIFAR's)."""
    return share is not None and num_classes >= 3 and share > COLLAPSE_SHARE


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of rows whose argmax equals the label, in [0, 1]."""
    return (logits.argmax(dim=1) == labels).float().mean().item()


@dataclass
class FitResult:
    """The outcome of :meth:`Trainer.fit`.

    history: one :class:`~labeldp.records.EpochRecord` per finished epoch (epoch, lr,
        train_loss, train_accuracy against the training targets — None when the step
        withholds them, as DP-SGD does — test_accuracy or None, seconds, ...).
    test_accuracy: accuracy in [0, 1] of ``eval_model`` on the test split after the last
        epoch, or None without a test split.
    train_seconds: wall-clock seconds spent in training steps, over all sessions of a
        resumed run; eval_seconds likewise for evaluation.
    eval_model: the model to evaluate and release (the weight average when EMA is on).
    diverged: training stopped early because the training loss or the weights became
        non-finite (NaN or ±inf) in the last epoch of ``history`` (marked ``"diverged":
        True`` there); test_accuracy is then that of the diverged model, as measured.
    collapsed: the final model sits on the constant-prediction plateau (one class takes
        more than :data:`COLLAPSE_SHARE` of its predictions on the evaluation split; each
        evaluated epoch records ``top_class_share``); test_accuracy is as measured.
    """

    history: list[EpochRecord]
    test_accuracy: float | None
    train_seconds: float
    eval_seconds: float
    eval_model: nn.Module
    resumed_from_epoch: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    diverged: bool = False
    collapsed: bool = False


class Trainer:
    """Trains ``model`` on ``train_images`` towards ``targets`` with SGD.

    train_images: uint8 (N, C, H, W) on the training device.
    targets: a :class:`TargetFn` (``HardLabels(labels)`` for plain training).
    test_images, test_labels: the evaluation split (optional), on the same device.
    normalize: uint8 -> normalized float batches. augment: uint8 -> uint8 batch
        augmentation taking a generator, or None.
    step: the gradient step (default: back-propagate the mean loss).
    sampler: the batch sampler (default: shuffled near-equal batches of batch_size).
    checkpoint_path: where to write a checkpoint (atomically) every ``checkpoint_every``
        epochs and after the last; None for no checkpoints.
    fingerprint: a JSON-able description of the run stored in the checkpoint; resuming
        from a checkpoint whose fingerprint differs is refused.
    stream_key: the run's configuration key (:func:`labeldp.seeding.config_key`) mixed
        into the per-epoch seeds, so that the batch order — DP-SGD's Poisson coins — of
        runs that differ in any option is independent; empty: seeds from (seed, epoch).
    """

    def __init__(
        self,
        model: nn.Module,
        train_images: torch.Tensor,
        targets: TargetFn,
        config: TrainConfig,
        *,
        normalize: Normalize,
        augment: Augmentation | None = None,
        test_images: torch.Tensor | None = None,
        test_labels: torch.Tensor | None = None,
        step: GradientStep | None = None,
        sampler: BatchSampler | None = None,
        checkpoint_path: str | Path | None = None,
        checkpoint_every: int = 1,
        fingerprint: dict[str, Any] | None = None,
        progress: bool = True,
        description: str = "train",
        stream_key: tuple[int, ...] = (),
    ) -> None:
        if train_images.dtype != torch.uint8 or train_images.dim() != 4:
            raise ValueError(
                f"train_images must be uint8 (N, C, H, W), got {train_images.dtype} "
                f"{tuple(train_images.shape)}"
            )
        if checkpoint_every < 1:
            raise ConfigError(f"checkpoint_every must be an integer ≥ 1, got {checkpoint_every}")
        self.device = train_images.device
        # Channels-last convolutions are markedly faster on CPU and on CUDA tensor cores.
        self.model = model.to(self.device, memory_format=torch.channels_last)
        self.train_images = train_images
        self.targets = as_targets(targets)
        self.config = config
        self.normalize = normalize
        self.augment = augment
        self.test_images = test_images
        self.test_labels = test_labels
        if step is None:
            step = BackpropStep(config.mixup_alpha)
        elif not isinstance(step, GradientStep):
            raise ConfigError(
                f"step must be a GradientStep (labeldp.train.GradientStep subclass), got "
                f"{type(step).__name__}"
            )
        elif config.mixup_alpha > 0 and not step.supports_mixup:
            raise ConfigError(
                f"mixup_alpha must be 0 for this method's gradient step "
                f"({type(step).__name__}), got {config.mixup_alpha}"
            )
        self.step = step
        # A step whose loss and logits are statistics of the raw training data that its
        # privacy guarantee does not cover (DP-SGD: true labels and features) sets
        # ``private_outputs``; the loop then neither shows nor records them.
        self.track_training_statistics = not self.step.private_outputs
        self.sampler = sampler or ShuffledBatches(config.batch_size)
        self.checkpoint_path = Path(checkpoint_path) if checkpoint_path is not None else None
        self.checkpoint_every = checkpoint_every
        self.fingerprint = fingerprint or {}
        self.progress = progress
        self.description = description
        self.stream_key = tuple(stream_key)
        self.autocast = autocast_for(self.device, config.precision)
        self.steps_per_epoch = self.sampler.steps_per_epoch(train_images.shape[0])
        self.total_steps = self.steps_per_epoch * config.epochs
        self.optimization = Optimization(
            config.sgd,
            self.model.parameters(),
            self.total_steps,
            WeightAverage(self.model, config.ema_decay) if config.ema_decay else None,
        )
        self.inputs = plain_inputs(normalize, augment)
        # one dict per epoch with the keys of EpochRecord's JSON form, completed as the epoch
        # is evaluated (checkpoints store them as is); FitResult.history holds the records
        self.history: list[dict[str, Any]] = []
        self.epochs_done = 0
        self.train_seconds = 0.0
        self.eval_seconds = 0.0

    # ----------------------------------------------------------------- public API
    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.optimization.optimizer

    @property
    def ema(self) -> WeightAverage | None:
        return self.optimization.ema  # type: ignore[return-value]

    @property
    def eval_model(self) -> nn.Module:
        return self.ema.model if self.ema is not None else self.model

    def fit(self, resume: bool = False) -> FitResult:
        """Runs the remaining epochs. With ``resume``, first loads the checkpoint if one
        exists (a missing checkpoint starts from scratch)."""
        resumed_from = 0
        if resume and self.checkpoint_path is not None and self.checkpoint_path.exists():
            self.load_checkpoint(self.checkpoint_path)
            resumed_from = self.epochs_done
        # a run checkpointed after it diverged stays stopped on resume
        diverged = bool(self.history and self.history[-1].get("diverged"))
        for epoch in range(self.epochs_done, self.config.epochs):
            if diverged:
                break
            self._train_epoch(epoch)
            if not self._finite():
                # Diverged (e.g. a far too large learning rate): more epochs cannot
                # recover; stop, record the measured accuracy and mark the outcome.
                diverged = True
                self.history[-1]["diverged"] = True
                if self.test_images is not None:
                    self.history[-1]["test_accuracy"] = self.evaluate()
                if self.checkpoint_path is not None:  # before the report, as below
                    self.save_checkpoint(self.checkpoint_path)
                self._report_epoch()
                if self.progress:
                    tqdm.write(
                        f"{self.description}: training diverged in epoch {epoch + 1} (the "
                        "loss or the weights are not finite); stopped"
                    )
                break
            last = epoch + 1 == self.config.epochs
            if self.test_images is not None and (last or (epoch + 1) % self.config.eval_every == 0):
                self.history[-1]["test_accuracy"] = self.evaluate()
            if self.checkpoint_path is not None and (
                last or (epoch + 1) % self.checkpoint_every == 0
            ):
                self.save_checkpoint(self.checkpoint_path)
            # Reported after the checkpoint: what a resume would redo is never shown.
            self._report_epoch()
        test_accuracy = self.history[-1]["test_accuracy"] if self.history else None
        return FitResult(
            collapsed=bool(self.history and self.history[-1].get("collapsed")),
            history=[EpochRecord.from_json(h) for h in self.history],
            test_accuracy=test_accuracy,
            train_seconds=self.train_seconds,
            eval_seconds=self.eval_seconds,
            eval_model=self.eval_model,
            resumed_from_epoch=resumed_from,
            diverged=diverged,
        )

    def evaluate(self) -> float:
        """Accuracy in [0, 1] of the evaluation model on the test split."""
        if self.test_images is None or self.test_labels is None:
            raise ValueError("no test split was given")
        start = time.perf_counter()
        logits = predict_logits(
            self.eval_model,
            self.test_images,
            self.normalize,
            self.config.eval_batch_size,
            self.autocast,
        )
        result = accuracy(logits, self.test_labels)
        if self.history:
            share = top_class_share(logits)
            self.history[-1]["top_class_share"] = share
            self.history[-1]["collapsed"] = collapsed(share, logits.shape[1])
        self.eval_seconds += time.perf_counter() - start
        return result

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "fingerprint": self.fingerprint,
            "epochs_done": self.epochs_done,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "history": self.history,
            "train_seconds": self.train_seconds,
            "eval_seconds": self.eval_seconds,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_fingerprint(state, self.fingerprint, _MISMATCH)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.epochs_done = state["epochs_done"]
        self.history = list(state["history"])
        self.train_seconds = state["train_seconds"]
        self.eval_seconds = state["eval_seconds"]

    def save_checkpoint(self, path: str | Path) -> None:
        """Writes the full training state atomically (temp file + rename)."""
        save_checkpoint(path, self.state_dict())

    def load_checkpoint(self, path: str | Path) -> None:
        self.load_state_dict(
            load_checkpoint(path, fingerprint=self.fingerprint, device=self.device,
                            mismatch=_MISMATCH)
        )  # fmt: skip

    # ------------------------------------------------------------------ internals
    @torch.no_grad()
    def _finite(self) -> bool:
        """Whether the last epoch's training loss (where recorded) and every weight are
        finite; one device synchronization per epoch."""
        loss = self.history[-1]["train_loss"] if self.history else None
        if loss is not None and not math.isfinite(loss):
            return False
        flags = [torch.isfinite(p).all() for p in self.model.parameters()]
        return bool(torch.stack(flags).all()) if flags else True

    def _train_epoch(self, epoch: int) -> None:
        cfg = self.config
        key = self.stream_key
        torch.manual_seed(derive_seed(cfg.seed, Stream.EPOCH_GLOBAL, epoch, key=key))
        generator = torch.Generator(device=self.device).manual_seed(
            derive_seed(cfg.seed, Stream.EPOCH_BATCHES, epoch, key=key)
        )
        self.step.start_epoch(epoch)  # a step with its own per-epoch random stream
        self.model.train()
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.int64)
        seen = 0
        first = epoch * self.steps_per_epoch
        end = first + self.steps_per_epoch
        lr = self.optimization.learning_rate(first)
        bar = tqdm(
            total=self.steps_per_epoch,
            desc=f"{self.description} {epoch + 1}/{cfg.epochs}",
            disable=not self.progress,
            leave=False,
            dynamic_ncols=True,
        )

        def after_step(number: int, indices: torch.Tensor, out: StepOutput) -> None:
            nonlocal loss_sum, correct, seen
            batch = indices.shape[0]
            if self.track_training_statistics:
                loss_sum += out.loss * batch
                correct += (out.logits.argmax(dim=1) == target_classes(out.targets)).sum()
            seen += batch
            bar.update(1)
            done = number + 1
            if self.progress and self.track_training_statistics and (done % 25 == 0 or done == end):
                bar.set_postfix(
                    loss=f"{loss_sum.item() / seen:.4f}", acc=f"{correct.item() / seen:.4f}"
                )

        start = time.perf_counter()
        last_lr = train_steps(
            self.model,
            self.train_images,
            self.targets,
            range(first, end),
            self.step,
            self.sampler,
            generator,
            optimization=self.optimization,
            inputs=self.inputs,
            autocast=self.autocast,
            after_step=after_step,
        )
        if last_lr is not None:
            lr = last_lr
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        bar.close()
        self.train_seconds += seconds
        self.epochs_done = epoch + 1
        self.history.append(
            {
                "epoch": epoch + 1,
                "lr": lr,
                "train_loss": loss_sum.item() / max(seen, 1)
                if self.track_training_statistics
                else None,
                "train_accuracy": correct.item() / max(seen, 1)
                if self.track_training_statistics
                else None,
                "test_accuracy": None,
                "seconds": seconds,
                **self.step.epoch_statistics(),
            }
        )

    def _report_epoch(self) -> None:
        if not self.progress:
            return
        h = self.history[-1]
        test = f"  test acc {h['test_accuracy']:.4f}" if h["test_accuracy"] is not None else ""
        train = (
            f"loss {h['train_loss']:.4f}  train acc {h['train_accuracy']:.4f}"
            if h["train_loss"] is not None
            else "training statistics withheld (private)"
        )
        tqdm.write(
            f"{self.description} epoch {h['epoch']}/{self.config.epochs}: "
            f"{train}{test}  ({h['seconds']:.1f} s)"
        )


__all__ = ["FitResult", "HardLabels", "Trainer", "accuracy", "predict_logits"]
