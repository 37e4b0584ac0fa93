"""pate-fm: PATE with FixMatch teachers and a FixMatch student (Malek et al. 2021).

Spec: shared/specs/pate_fixmatch.md. The pipeline:

1. the training set is split at random, without looking at labels, into ``teachers``
   disjoint parts; teacher i sees the labels of part i and every training image
   unlabeled; all teachers train together (:mod:`labeldp.train.ensemble`), in groups of
   ``teacher_group`` whose votes are saved as each group finishes (a resumed run skips
   finished groups). The votes do not depend on the aggregation's parameters (ε, δ, T,
   σ₁, σ₂), so with a shared folder (sweeps) the runs of one seed that differ only in
   those train the teachers once: a run that finds the votes uses them, exactly as if it
   had recomputed them (teacher training is seeded and noise-free);
2. ``queries`` training images, chosen at random without looking at labels, get the
   teachers' vote histograms;
3. Confident-GNMax (threshold ``threshold``, noises ``sigma1``, ``sigma2``) answers them in
   order until the data-dependent ε would exceed the budget ``epsilon`` at ``delta``;
   its records are drawn once and stored (``pate.noisy.pt``);
4. the student trains with FixMatch on the answered queries and every training image
   unlabeled, with the run's training configuration (batch size = labeled batch; set
   ``ema_decay`` for FixMatch's EMA model).

The ledger's ε is the data-dependent one (it depends on the private votes); the
data-independent ε of the same answers is recorded beside it.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, ClassVar

import numpy as np
import torch

from ..data.dataset import random_partition, random_subset
from ..errors import ConfigError, check_int
from ..io import atomic_write
from ..mechanisms.confident_gnmax import ConfidentGNMax
from ..mechanisms.validation import check_epsilon
from ..privacy import LedgerEntry, PrivacyLedger
from ..privacy.pate_accounting import pate_epsilon
from ..seeding import Stream, derive_seed
from ..strong_augment import StrongAugment
from ..train import FitResult, HardLabels
from ..train.ensemble import (
    EnsembleFixMatchConfig,
    StackedModels,
    ensemble_votes,
    train_fixmatch_ensemble,
)
from ..train.fixmatch import FixMatchStep
from .base import MethodResult, RunContext, untrained


def _unchanged(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The weak view when the run has no augmentation: the images themselves."""
    return images


#: Options that act only on the aggregation, the budget or the student, not on the
#: teachers' votes.
VOTE_INDEPENDENT_OPTIONS = (
    "epsilon", "delta", "threshold", "sigma1", "sigma2", "secure_noise", "student_steps"
)  # fmt: skip


class PateFM:
    """PATE-FM. Hyper-parameters (units: votes for threshold and noises):

    epsilon: the budget ε > 0 at ``delta`` (data-dependent, label DP).
    delta: δ in (0, 1), default 1e-5.
    teachers: number of teachers n ≥ 2. queries: query pool size M ≥ 1.
    threshold: T; sigma1: threshold noise σ₁ > 0; sigma2: argmax noise σ₂ > 0.
    teacher_steps: FixMatch steps per teacher ≥ 1; teacher_batch: labeled batch per
    teacher and step; teacher_lr: SGD learning rate; teacher_model: model name for the
    teachers (default: the run's); teacher_group: teachers trained at once (≥ 1).
    mu, fixmatch_threshold: FixMatch's μ and τ, for teachers and student.
    student_steps: optimizer steps of the student (≥ 1): its epochs over the answered
    queries become ceil(student_steps / batches per epoch), so that a small budget (few
    answers) still trains the student as long; None: the run's ``epochs``.
    secure_noise: aggregation noise from OS entropy.
    """

    name: ClassVar[str] = "pate-fm"
    epsilon_meaning: ClassVar[str] = (
        "ε is data-dependent (Papernot et al. 2018): it depends on the private votes, and "
        "releasing it would need the smooth-sensitivity analysis"
    )

    def __init__(
        self,
        epsilon: float,
        teachers: int,
        queries: int,
        threshold: float,
        sigma1: float,
        sigma2: float,
        delta: float = 1e-5,
        teacher_steps: int = 500,
        teacher_batch: int = 16,
        teacher_lr: float = 0.03,
        teacher_model: str | None = None,
        teacher_group: int = 50,
        mu: int = 7,
        fixmatch_threshold: float = 0.95,
        student_steps: int | None = None,
        secure_noise: bool = False,
    ) -> None:
        self.epsilon = check_epsilon(epsilon)
        check_int("teachers", teachers, 2)
        check_int("queries", queries, 1)
        check_int("teacher_steps", teacher_steps, 1)
        check_int("teacher_batch", teacher_batch, 1)
        check_int("teacher_group", teacher_group, 1)
        check_int("mu", mu, 1)
        if student_steps is not None:
            check_int("student_steps", student_steps, 1)
        for name, value in (("sigma1", sigma1), ("sigma2", sigma2), ("teacher_lr", teacher_lr)):
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{name} must be a finite number > 0, got {value}")
        if not math.isfinite(threshold):
            raise ConfigError(f"threshold must be a finite number of votes, got {threshold}")
        if not 0 < delta < 1:
            raise ConfigError(f"delta must be in (0, 1), got {delta}")
        if not 0 < fixmatch_threshold <= 1:
            raise ConfigError(f"fixmatch_threshold must be in (0, 1], got {fixmatch_threshold}")
        self.teachers, self.queries = teachers, queries
        self.threshold, self.sigma1, self.sigma2 = float(threshold), float(sigma1), float(sigma2)
        self.delta = float(delta)
        self.teacher_steps, self.teacher_batch = teacher_steps, teacher_batch
        self.teacher_lr, self.teacher_model = float(teacher_lr), teacher_model
        self.teacher_group, self.mu = teacher_group, mu
        self.fixmatch_threshold = float(fixmatch_threshold)
        self.student_steps = student_steps
        self.secure_noise = bool(secure_noise)

    def options(self) -> dict[str, Any]:
        return {
            "epsilon": self.epsilon,
            "teachers": self.teachers,
            "queries": self.queries,
            "threshold": self.threshold,
            "sigma1": self.sigma1,
            "sigma2": self.sigma2,
            "delta": self.delta,
            "teacher_steps": self.teacher_steps,
            "teacher_batch": self.teacher_batch,
            "teacher_lr": self.teacher_lr,
            "teacher_model": self.teacher_model,
            "teacher_group": self.teacher_group,
            "mu": self.mu,
            "fixmatch_threshold": self.fixmatch_threshold,
            "student_steps": self.student_steps,
            "secure_noise": self.secure_noise,
        }

    # ------------------------------------------------------------------ pipeline
    def _votes(self, ctx: RunContext, query_idx: torch.Tensor) -> torch.Tensor:
        """Vote histograms (M, K) of all teachers on the query images; each group's
        votes are stored (in the shared folder, else the run folder) once the group has
        finished."""
        seed = ctx.config.seed
        n = len(ctx.train.labels)
        if self.teachers > n:
            raise ConfigError(f"teachers ({self.teachers}) must be at most the examples ({n})")
        parts = random_partition(n, self.teachers, derive_seed(seed, Stream.PATE_PARTITION))
        k = ctx.train.info.num_classes
        config = EnsembleFixMatchConfig(
            steps=self.teacher_steps,
            batch_size=self.teacher_batch,
            mu=self.mu,
            threshold=self.fixmatch_threshold,
            lr=self.teacher_lr,
            seed=derive_seed(seed, Stream.PATE_TEACHERS),
        )
        queries = ctx.train.images[query_idx.to(ctx.train.images.device)]
        folder = ctx.shared_folder(
            "pate-votes",
            {k: v for k, v in self.options().items() if k not in VOTE_INDEPENDENT_OPTIONS},
        )
        total = torch.zeros(len(query_idx), k, dtype=torch.int64, device=ctx.train.images.device)
        for start in range(0, self.teachers, self.teacher_group):
            group = range(start, min(start + self.teacher_group, self.teachers))
            path = folder / f"votes-{start}.pt" if folder is not None else None
            if path is not None and path.exists():
                total += torch.load(path, map_location=total.device, weights_only=True)
                continue
            models = []
            for i in group:
                torch.manual_seed(derive_seed(seed, Stream.PATE_TEACHERS, i))
                models.append(ctx.build_named_model(self.teacher_model))
            stacked = StackedModels([m.to(total.device) for m in models])
            ema = train_fixmatch_ensemble(
                stacked,
                ctx.train.images,
                ctx.train.labels,
                [parts[i] for i in group],
                config,
                normalize=ctx.normalize,
                weak=ctx.augment or _unchanged,
                strong=StrongAugment(),
                checkpoint_path=folder / f"teachers-{start}.ckpt" if folder else None,
                progress=ctx.progress,
            )
            votes = ensemble_votes(stacked, ema, queries, ctx.normalize, k)
            if path is not None:
                atomic_write(path, lambda handle, v=votes: torch.save(v.cpu(), handle))
                (folder / f"teachers-{start}.ckpt").unlink(missing_ok=True)
            total += votes
        return total

    def _student(self, ctx: RunContext, labels: torch.Tensor, taught: torch.Tensor) -> FitResult:
        """FixMatch on the answered queries ``taught`` (train indices) with ``labels``
        and every training image unlabeled."""
        device = ctx.train.images.device
        student_step = FixMatchStep(
            ctx.train.images,
            ctx.normalize,
            weak=ctx.augment or _unchanged,
            strong=StrongAugment(),
            mu=self.mu,
            threshold=self.fixmatch_threshold,
            seed=derive_seed(ctx.config.seed, Stream.FIXMATCH_UNLABELED),
            labeled_batch=ctx.config.batch_size,  # μ·B unlabeled even with < B answers
        )
        config = None
        if self.student_steps is not None:
            per_epoch = math.ceil(len(taught) / min(ctx.config.batch_size, len(taught)))
            epochs = math.ceil(self.student_steps / per_epoch)
            config = dataclasses.replace(ctx.config, epochs=epochs, eval_every=epochs)
        return ctx.fit(
            HardLabels(labels.to(device)),
            name="student",
            subset=taught.to(device),
            step=student_step,
            config=config,
        )

    def run(self, ctx: RunContext) -> MethodResult:
        seed = ctx.config.seed
        n = len(ctx.train.labels)
        if self.queries > n:
            raise ConfigError(f"queries ({self.queries}) must be at most the examples ({n})")
        query_idx = random_subset(n, self.queries, derive_seed(seed, Stream.PATE_QUERIES))
        aggregator = ConfidentGNMax(self.threshold, self.sigma1, self.sigma2, self.secure_noise)

        def aggregate() -> torch.Tensor:
            votes = self._votes(ctx, query_idx).cpu().numpy()
            generator = (
                None
                if self.secure_noise
                else torch.Generator().manual_seed(derive_seed(seed, Stream.PATE_NOISE))
            )
            out = aggregator.aggregate(votes, generator, budget=self.epsilon, delta=self.delta)
            considered = len(out.votes)
            record = torch.full((3 + votes.shape[1], len(votes)), -1, dtype=torch.int64)
            record[0, :considered] = torch.from_numpy(out.answered.astype(np.int64))
            record[1, :considered] = torch.from_numpy(out.labels)
            record[2] = query_idx
            record[3:] = torch.from_numpy(votes.T.astype(np.int64))
            return record

        record = ctx.privatized("pate", aggregate).cpu()
        considered = int((record[0] >= 0).sum())
        answered = record[0, :considered].numpy().astype(bool)
        votes = record[3:, :considered].T.numpy()
        labels = record[1, :considered][torch.from_numpy(answered)]
        taught = record[2, :considered][torch.from_numpy(answered)]
        if considered:
            args = (votes, answered, self.threshold, self.sigma1, self.sigma2, self.delta)
            eps, eps_independent = pate_epsilon(*args), pate_epsilon(*args, False)
        else:  # the budget did not cover one threshold check: nothing was released
            eps = eps_independent = 0.0
        if len(taught) == 0:
            warnings.warn(
                f"pate-fm: no query answered within ε = {self.epsilon:g}; the student has "
                "no labels and is left untrained (chance accuracy). Raise epsilon, or "
                "lower the threshold or the noise.",
                stacklevel=2,
            )
            fit = untrained(ctx)
        else:
            fit = self._student(ctx, labels, taught)
        true = ctx.train.labels.cpu()[taught]
        fit.extra.update(
            {
                "answered": int(answered.sum()),
                "considered": considered,
                "label_accuracy_of_answers": (labels == true).float().mean().item()
                if len(taught)
                else None,
            }
        )
        ledger = PrivacyLedger()
        ledger.record(
            LedgerEntry(
                mechanism="confident-gnmax",
                epsilon=eps,
                delta=self.delta,
                examples=n,
                details={
                    "data_dependent": True,
                    "epsilon_data_independent": eps_independent,
                    "epsilon_budget": self.epsilon,
                    "teachers": self.teachers,
                    "queries_considered": considered,
                    "queries_answered": int(answered.sum()),
                    "threshold": self.threshold,
                    "sigma1": self.sigma1,
                    "sigma2": self.sigma2,
                    "accountant": "data-dependent RDP (Papernot et al. 2018), Balle et al. "
                    "2020 conversion",
                },
            )
        )
        return MethodResult(fit=fit, ledger=ledger)
