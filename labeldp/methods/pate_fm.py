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
   order while a Rényi privacy filter on the data-independent cost admits the next step
   (:mod:`labeldp.mechanisms.confident_gnmax`): the run is (``epsilon``, ``delta``)-DP
   whatever the votes. The release (answered flags, labels, the query pool) is drawn once
   and stored (``pate.noisy.pt``); the raw votes are a diagnostic
   (``diagnostics/pate_votes.pt``), never part of the release;
4. the student trains with FixMatch on the answered queries and every training image
   unlabeled, with the run's training configuration (batch size = labeled batch; set
   ``ema_decay`` for FixMatch's EMA model).

The ledger's ε is the guarantee: the filter's budget (or the data-independent ε of
answering the whole pool, when smaller). The data-dependent ε of Papernot et al. (2018)
is smaller but a function of the private votes; it is recorded under ``diagnostics``
(not publishable as it stands). Every canary planted in the run is in the query pool.

Diagnostics (outside the guarantee: computed from the raw votes and the true labels,
``ctx.diagnostic_labels``, a canary's original label rather than its planted one) go under
``metrics.json["diagnostics"]``; see :func:`answer_diagnostics`,
:func:`teacher_accuracy_summary` and :meth:`PateFM.run` for the keys. One of them, the
"ceiling student" (``ceiling_student``), is the student's recipe trained on the true
labels of the answered queries: what the student would reach if every answer were right.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import dp_accounting
import numpy as np
import torch

from ..data.dataset import random_partition, random_subset
from ..errors import ConfigError
from ..io import atomic_write
from ..mechanisms.confident_gnmax import ConfidentGNMax
from ..mechanisms.randomness import standard_normal
from ..models.norm import has_batch_statistics
from ..options import DELTA, EPSILON, POSITIVE, SWITCH, MethodOptions, Number, Text, option
from ..privacy import LedgerEntry, Neighbouring, PrivacyLedger
from ..privacy.pate_accounting import pate_epsilon
from ..privacy.pate_smooth_sensitivity import gnss_rdp, gnss_sigma, release
from ..privacy.renyi_filter import rdp_budget
from ..seeding import Stream, derive_seed
from ..strong_augment import StrongAugment
from ..train import FitResult, HardLabels
from ..train.ensemble import (
    EnsembleFixMatchConfig,
    StackedModels,
    ensemble_predictions,
    ensemble_votes,
    train_fixmatch_ensemble,
)
from ..train.fixmatch import FixMatchStep
from .base import Method, MethodResult, RunCheck, RunContext, untrained


def _unchanged(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The weak view when the run has no augmentation: the images themselves."""
    return images


#: Options that act only on the aggregation, the budget or the student, not on the
#: teachers' votes.
VOTE_INDEPENDENT_OPTIONS = (
    "epsilon", "delta", "threshold", "sigma1", "sigma2", "secure_noise", "student_steps",
    "release_data_dependent", "release_share", "ceiling_student",
)  # fmt: skip

#: Smoothness of the smooth-sensitivity release, as β·λ at the filter's order λ.
RELEASE_BETA_TIMES_ORDER = 0.2


@dataclass(frozen=True)
class PateFMOptions(MethodOptions):
    """Options of ``pate-fm``; see :class:`PateFM` (units: votes for the threshold and
    the noises)."""

    epsilon: float = option(
        kind=EPSILON,
        help="the budget ε at delta (replace one label), enforced by a Rényi filter on the "
        "data-independent cost",
    )
    teachers: int = option(
        kind=Number(int, 2), metavar="N", help="number of teachers (disjoint label parts)"
    )
    queries: int = option(
        kind=Number(int, 1), metavar="M", help="query pool: training images the teachers label"
    )
    threshold: float = option(
        kind=Number(float), metavar="T", help="Confident-GNMax threshold, in votes"
    )
    sigma1: float = option(
        kind=POSITIVE, metavar="S1", help="threshold noise standard deviation, in votes"
    )
    sigma2: float = option(
        kind=POSITIVE, metavar="S2", help="argmax noise standard deviation, in votes"
    )
    delta: float = option(1e-5, kind=DELTA, help="δ of the budget")
    teacher_steps: int = option(
        500, kind=Number(int, 1), metavar="K", help="FixMatch steps per teacher"
    )
    teacher_batch: int = option(
        16, kind=Number(int, 1), metavar="B", help="labeled batch per teacher and step"
    )
    teacher_lr: float = option(0.03, kind=POSITIVE, metavar="LR", help="teachers' learning rate")
    teacher_model: str | None = option(
        None, kind=Text(), metavar="NAME", help="teachers' model", none="the run's model"
    )
    teacher_group: int = option(
        50, kind=Number(int, 1), metavar="G", help="teachers trained at once"
    )
    mu: int = option(7, kind=Number(int, 1), metavar="MU", help="FixMatch unlabeled per labeled")
    fixmatch_threshold: float = option(
        0.95,
        kind=Number(float, 0, 1, low_open=True),
        metavar="TAU",
        help="FixMatch confidence threshold τ",
    )
    student_steps: int | None = option(
        None,
        kind=Number(int, 1),
        metavar="S",
        help="student optimizer steps, whatever the number of answers",
        none="the run's epochs over the answers",
    )
    secure_noise: bool = option(
        False,
        kind=SWITCH,
        help="draw the aggregation noise from OS entropy instead of the run seed",
    )
    release_data_dependent: bool = option(
        False,
        kind=SWITCH,
        help="also publish the data-dependent ε through the smooth-sensitivity (GNSS) release "
        "of Papernot et al. 2018, paid from the budget",
    )
    release_share: float = option(
        0.25,
        kind=Number(float, 0, 1, low_open=True, high_open=True),
        metavar="F",
        help="share of the filter's RDP budget kept for release_data_dependent",
    )
    ceiling_student: bool = option(
        True,
        kind=SWITCH,
        help="also train the student on the true labels of the answered queries, a "
        "diagnostic outside the guarantee",
    )


class PateFM(Method):
    """PATE-FM. Hyper-parameters (units: votes for threshold and noises):

    epsilon: the budget ε > 0 at ``delta`` (label DP, replace one label): a Rényi filter
    on the data-independent cost stops answering before it would be exceeded.
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
    release_data_dependent: also publish the data-dependent ε with the smooth-sensitivity
    (GNSS) release of Papernot et al. 2018 (:mod:`labeldp.privacy.pate_smooth_sensitivity`),
    at the filter's order λ with β = 0.2/λ; its cost is fixed in advance and taken from
    the budget, so the run's ε stays ``epsilon``.
    release_share: the share of the filter's RDP budget kept for that release, in (0, 1).
    ceiling_student: also train the "ceiling student" (a diagnostic, outside the
    guarantee): the student's recipe (same steps, seeds and schedule) on the *true*
    labels of the answered queries, its accuracy on the evaluation split recorded as
    ``diagnostics.ceiling_student_accuracy`` in [0, 1]. It roughly doubles the student's
    training time; False skips it (the key is then null). Its checkpoint lives under
    ``diagnostics/``, it draws no privacy noise and leaves the released outputs unchanged.
    """

    name: ClassVar[str] = "pate-fm"
    Options: ClassVar[type[MethodOptions]] = PateFMOptions
    shared_independent_options: ClassVar[tuple[str, ...] | None] = VOTE_INDEPENDENT_OPTIONS
    epsilon_meaning: ClassVar[str] = (
        "ε is the guarantee of a Rényi filter on the data-independent cost of "
        "Confident-GNMax (replace one label); the smaller data-dependent ε is a "
        "diagnostic"
    )

    def __init__(self, *args: Any, **options: Any) -> None:
        super().__init__(*args, **options)
        if self.release_data_dependent:
            self._release_plan()  # refuses a budget too small for the release, now

    def _release_plan(self) -> dict[str, float]:
        """Order λ, β, the reserved RDP and σ_s of the smooth-sensitivity release: public,
        fixed from (ε, δ, release_share) before any vote is seen."""
        order = ConfidentGNMax.filter_order(self.epsilon, self.delta)
        share = self.release_share * rdp_budget(self.epsilon, self.delta, order)
        beta = RELEASE_BETA_TIMES_ORDER / order
        sigma_s = gnss_sigma(beta, order, share)
        # the filter reserves the release's actual cost (equal to the share up to float
        # rounding, which must not go unaccounted)
        return {"order": order, "beta": beta, "sigma_s": sigma_s,
                "reserve": gnss_rdp(beta, sigma_s, order)}  # fmt: skip

    def check(self, run: RunCheck) -> None:
        """Refuses, before the run folder is written, more teachers or queries than
        training examples, fewer queries than canaries (all must be in the pool), and
        mixup (the FixMatch student does not mix), and teachers with BatchNorm (they train
        together, vectorized, with no per-teacher running statistics)."""
        if run.config.mixup_alpha > 0:
            raise ConfigError(
                f"mixup_alpha (--mixup) must be 0 for pate-fm (its FixMatch student does not "
                f"mix), got {run.config.mixup_alpha}"
            )
        self._check_sizes(run.num_examples, run.canaries)
        if run.build_named_model is not None:
            with torch.random.fork_rng(devices=[]):
                teacher = run.build_named_model(self.teacher_model)
            if has_batch_statistics(teacher):
                raise ConfigError(
                    "pate-fm's teachers train together and must not have BatchNorm (no "
                    "per-teacher running statistics): use --norm group, or a --teacher-model "
                    f"without batch statistics (got {self.teacher_model or 'the run model'} "
                    "with --norm batch)"
                )

    def _check_sizes(self, n: int, canaries: int) -> None:
        """The size checks of :meth:`check`, for ``n`` examples and ``canaries`` planted
        (also run by :meth:`run`, which may be called without :meth:`check`)."""
        if self.teachers > n:
            raise ConfigError(f"teachers ({self.teachers}) must be at most the examples ({n})")
        if self.queries > n:
            raise ConfigError(f"queries ({self.queries}) must be at most the examples ({n})")
        if canaries > self.queries:
            raise ConfigError(
                f"queries ({self.queries}) must be at least the number of canaries "
                f"({canaries}) so that every canary is in PATE's query pool"
            )

    # ------------------------------------------------------------------ pipeline
    def _teacher_recipe(self, ctx: RunContext) -> tuple[EnsembleFixMatchConfig, Path | None]:
        """The teachers' FixMatch configuration and the folder of their votes (the shared
        folder keyed by everything the votes depend on, else the run's ``diagnostics/``;
        None without either)."""
        config = EnsembleFixMatchConfig(
            steps=self.teacher_steps,
            batch_size=self.teacher_batch,
            mu=self.mu,
            threshold=self.fixmatch_threshold,
            lr=self.teacher_lr,
            seed=derive_seed(ctx.config.seed, Stream.PATE_TEACHERS),
        )
        identity = {k: v for k, v in self.options().items() if k not in VOTE_INDEPENDENT_OPTIONS}
        # the teachers' whole recipe (schedule included), so that votes made under
        # another recipe are never reused
        identity["teacher_training"] = dataclasses.asdict(config)
        return config, ctx.shared_folder("pate-votes", identity)

    def _votes(self, ctx: RunContext, query_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Vote histograms (M, K) of all teachers on the query images and each teacher's
        accuracy (n,) float64 in [0, 1] on the evaluation split ``ctx.test`` (its EMA
        model, the one that votes). Each group's votes and accuracies are stored (in the
        shared folder, else the run folder) once the group has finished; a group whose
        votes were stored before accuracies were recorded has NaN accuracies."""
        seed = ctx.config.seed
        n = len(ctx.train.labels)
        parts = random_partition(n, self.teachers, derive_seed(seed, Stream.PATE_PARTITION))
        k = ctx.train.info.num_classes
        config, folder = self._teacher_recipe(ctx)
        queries = ctx.train.images[query_idx.to(ctx.train.images.device)]
        total = torch.zeros(len(query_idx), k, dtype=torch.int64, device=ctx.train.images.device)
        accuracy = torch.full((self.teachers,), math.nan, dtype=torch.float64)
        for start in range(0, self.teachers, self.teacher_group):
            group = range(start, min(start + self.teacher_group, self.teachers))
            path = folder / f"votes-{start}.pt" if folder is not None else None
            if path is not None and path.exists():
                total += torch.load(path, map_location=total.device, weights_only=True)
                accuracy[start : group.stop] = _load_teacher_accuracy(folder, start, len(group))
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
            predicted = ensemble_predictions(stacked, ema, ctx.test.images, ctx.normalize)
            right = predicted == ctx.test.labels.to(predicted.device)[None, :]
            group_accuracy = right.double().mean(1).cpu()
            if path is not None:
                # the accuracies first: the votes file marks the group as finished
                acc_path = folder / f"teacher-accuracy-{start}.pt"
                atomic_write(acc_path, lambda handle, a=group_accuracy: torch.save(a, handle))
                atomic_write(path, lambda handle, v=votes: torch.save(v.cpu(), handle))
                (folder / f"teachers-{start}.ckpt").unlink(missing_ok=True)
            total += votes
            accuracy[start : group.stop] = group_accuracy
        return total, accuracy

    def _stored_teacher_accuracy(self, ctx: RunContext) -> torch.Tensor:
        """The teachers' accuracies (n,) from the group files of the votes folder, without
        training anything (NaN where a group has none), for a resumed run that started
        before the run-level copy was written."""
        _, folder = self._teacher_recipe(ctx)
        accuracy = torch.full((self.teachers,), math.nan, dtype=torch.float64)
        if folder is not None:
            for start in range(0, self.teachers, self.teacher_group):
                size = min(self.teacher_group, self.teachers - start)
                accuracy[start : start + size] = _load_teacher_accuracy(folder, start, size)
        return accuracy

    def _student(
        self,
        ctx: RunContext,
        labels: torch.Tensor,
        taught: torch.Tensor,
        name: str = "student",
    ) -> FitResult:
        """FixMatch on the answered queries ``taught`` (train indices) with ``labels``
        and every training image unlabeled; ``name``: the checkpoint's stage name."""
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
            name=name,
            subset=taught.to(device),
            step=student_step,
            config=config,
        )

    def query_pool(self, ctx: RunContext) -> torch.Tensor:
        """The ``queries`` train positions the teachers are asked about, sorted, chosen
        without looking at labels. Every planted canary is in the pool (so that an audit
        can see whether its label reaches the student); the rest is a seeded random
        subset of the other examples. Canary positions are themselves a label-independent
        random choice, so the pool is a uniformly random subset either way."""
        n = len(ctx.train.labels)
        seed = derive_seed(ctx.config.seed, Stream.PATE_QUERIES)
        canaries = ctx.canary_indices
        if canaries is None or len(canaries) == 0:
            return random_subset(n, self.queries, seed)
        canaries = canaries.cpu()
        if len(canaries) == self.queries:
            return canaries.sort().values
        is_canary = torch.zeros(n, dtype=torch.bool)
        is_canary[canaries] = True
        rest = torch.nonzero(~is_canary).flatten()
        fill = rest[random_subset(len(rest), self.queries - len(canaries), seed)]
        return torch.cat([canaries, fill]).sort().values

    def guarantee(self, aggregator: ConfidentGNMax) -> float:
        """The run's ε at δ, fixed before any vote is seen: the filter's budget, or less
        when answering the whole pool costs less (data-independent)."""
        if self.release_data_dependent:  # filter + release together fit the budget
            return self.epsilon
        return min(self.epsilon, aggregator.worst_case_epsilon(self.queries, self.delta))

    def run(self, ctx: RunContext) -> MethodResult:
        n = len(ctx.train.labels)
        planted = ctx.canary_indices
        self._check_sizes(n, len(planted) if planted is not None else 0)
        query_idx = self.query_pool(ctx)
        aggregator = ConfidentGNMax(self.threshold, self.sigma1, self.sigma2, self.secure_noise)
        diagnostics = ctx.diagnostics()
        votes_path = diagnostics / "pate_votes.pt" if diagnostics is not None else None
        accuracy_path = (
            diagnostics / "pate_teacher_accuracy.pt" if diagnostics is not None else None
        )
        # the votes and teacher accuracies, when this session computes them
        computed: list[tuple[torch.Tensor, torch.Tensor]] = []

        def aggregate() -> torch.Tensor:
            votes, teacher_accuracy = self._votes(ctx, query_idx)
            votes = votes.cpu()
            computed.append((votes, teacher_accuracy))
            if votes_path is not None:  # raw votes: a diagnostic, never in the release
                atomic_write(accuracy_path, lambda handle: torch.save(teacher_accuracy, handle))
                atomic_write(votes_path, lambda handle: torch.save(votes, handle))
            generator = (
                None
                if self.secure_noise
                else torch.Generator().manual_seed(ctx.noise_seed(Stream.PATE_NOISE))
            )
            reserve = self._release_plan()["reserve"] if self.release_data_dependent else 0.0
            out = aggregator.aggregate(
                votes.numpy(), generator, budget=self.epsilon, delta=self.delta, reserve=reserve
            )
            considered = len(out.votes)
            # The release: answered flag (−1: never considered), label (−1: none) and the
            # query pool (public). Nothing computed from the raw votes without noise.
            record = torch.full((3, len(query_idx)), -1, dtype=torch.int64)
            record[0, :considered] = torch.from_numpy(out.answered.astype(np.int64))
            record[1, :considered] = torch.from_numpy(out.labels)
            record[2] = query_idx
            return record

        record = ctx.privatized("pate", aggregate).cpu()
        considered = int((record[0] >= 0).sum())
        answered = record[0, :considered].numpy().astype(bool)
        labels = record[1, :considered][torch.from_numpy(answered)]
        taught = record[2, :considered][torch.from_numpy(answered)]
        if computed:
            pool_votes, teacher_accuracy = computed[0]
        elif votes_path is not None and votes_path.exists():  # a resumed run
            pool_votes = torch.load(votes_path, weights_only=True)
            if accuracy_path is not None and accuracy_path.exists():
                teacher_accuracy = torch.load(accuracy_path, weights_only=True)
            else:  # started before accuracies were recorded
                teacher_accuracy = self._stored_teacher_accuracy(ctx)
        else:  # resumed without the diagnostic: the (seeded, noise-free) votes again
            pool_votes, teacher_accuracy = self._votes(ctx, query_idx)
        pool_votes = pool_votes.cpu().numpy()
        votes = pool_votes[:considered]
        eps = self.guarantee(aggregator)
        if considered:
            args = (votes, answered, self.threshold, self.sigma1, self.sigma2, self.delta)
            eps_dependent = pate_epsilon(*args)
            eps_transcript = pate_epsilon(*args, data_dependent=False)
        else:
            eps_dependent = eps_transcript = 0.0
        if len(taught) == 0:
            warnings.warn(
                f"pate-fm: no query answered within ε = {self.epsilon:g}; the student has "
                "no labels and is left untrained (chance accuracy). Raise epsilon, or "
                "lower the threshold or the noise (one answer costs about λ/σ₂² in RDP).",
                stacklevel=2,
            )
            fit = untrained(ctx)
        else:
            fit = self._student(ctx, labels, taught)
        fit.extra.update({"answered": int(answered.sum()), "considered": considered})
        # diagnostics compare with the true labels (a canary's original, not its planted one)
        true = ctx.diagnostic_labels.cpu()[taught]
        seen = ctx.diagnostic_labels.cpu()[record[2]].numpy()
        not_private: dict[str, Any] = {
            **answer_diagnostics(
                pool_votes, seen, answered, labels.numpy(), ctx.train.info.num_classes
            ),
            "epsilon_data_dependent": eps_dependent,
            **teacher_accuracy_summary(teacher_accuracy),
            **self._ceiling(ctx, fit, true, taught),
        }
        order = ConfidentGNMax.filter_order(self.epsilon, self.delta)
        published = None
        if self.release_data_dependent:
            published, not_private["release"] = self._release(ctx, votes, answered)
        ledger = PrivacyLedger()
        ledger.record(
            LedgerEntry(
                mechanism="confident-gnmax",
                epsilon=eps,
                delta=self.delta,
                examples=n,
                details={
                    "data_dependent": False,
                    "stopping_rule": "renyi-filter",
                    "filter": {
                        "order": order,
                        "rdp_budget": rdp_budget(self.epsilon, self.delta, order),
                        "threshold_check_rdp": order / (2 * self.sigma1**2),
                        "answer_rdp": order / self.sigma2**2,
                        "reference": "Feldman & Zrnic 2021 (Rényi filter); Balle et al. "
                        "2020 conversion",
                    },
                    "epsilon_budget": self.epsilon,
                    "epsilon_worst_case_pool": aggregator.worst_case_epsilon(
                        self.queries, self.delta
                    ),
                    "epsilon_data_independent_of_transcript": eps_transcript,
                    "teachers": self.teachers,
                    "queries_considered": considered,
                    "queries_answered": int(answered.sum()),
                    "threshold": self.threshold,
                    "sigma1": self.sigma1,
                    "sigma2": self.sigma2,
                    "secure_noise": self.secure_noise,
                    "accountant": "Rényi filter on the data-independent cost (threshold "
                    "check λ/(2σ₁²), answer λ/σ₂²) at one order fixed in advance",
                    "data_dependent_release": published,
                },
                relation=Neighbouring.REPLACE_ONE_LABEL,
                event=dp_accounting.UnsupportedDpEvent(),
                event_note="no event: the Rényi filter stops after a number of answers "
                "that depends on the run (on public information only), so the guarantee is "
                "the filter's (ε, δ), not a fixed composition of events; the data-dependent "
                "ε is a diagnostic with no event either",
            )
        )
        return MethodResult(fit=fit, ledger=ledger, diagnostics=not_private)

    def _ceiling(
        self, ctx: RunContext, fit: FitResult, true: torch.Tensor, taught: torch.Tensor
    ) -> dict[str, Any]:
        """The ceiling student (a diagnostic): :meth:`_student` on the labels the run sees
        (``true``: ``ctx.diagnostic_labels`` of the answered queries ``taught``) instead of
        the answers. Keys: ``ceiling_student_accuracy`` (on ``ctx.test``, in [0, 1]; null
        when ``ceiling_student`` is off) and ``ceiling_student_outcome`` ("finished",
        "diverged", "collapsed", "untrained": nothing answered, so the ceiling is the
        untrained model the student also is, or "off").

        Its checkpoint is ``diagnostics/ceiling-student.ckpt`` (never beside the released
        model; removed once trained, so a resume after that trains it again, to the same
        result). Under :func:`torch.random.fork_rng`, with the student's seeds: it
        consumes no privacy-noise stream and leaves the global generators as they were."""
        if not self.ceiling_student:
            return {"ceiling_student_accuracy": None, "ceiling_student_outcome": "off"}
        if len(taught) == 0:
            return {
                "ceiling_student_accuracy": fit.test_accuracy,
                "ceiling_student_outcome": "untrained",
            }
        diagnostics = ctx.diagnostics()
        where = dataclasses.replace(ctx, run_dir=diagnostics)  # no checkpoint beside model.pt
        device = ctx.train.images.device
        devices = []
        if device.type == "cuda":
            devices = [device.index if device.index is not None else torch.cuda.current_device()]
        with torch.random.fork_rng(devices=devices):
            result = self._student(where, true, taught, name="ceiling-student")
        if diagnostics is not None:
            (diagnostics / "ceiling-student.ckpt").unlink(missing_ok=True)
        outcome = "diverged" if result.diverged else "collapsed" if result.collapsed else "finished"
        return {
            "ceiling_student_accuracy": result.test_accuracy,
            "ceiling_student_outcome": outcome,
        }

    def _release(
        self, ctx: RunContext, votes: np.ndarray, answered: np.ndarray
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """The GNSS release of the data-dependent cost, drawn once (``pate-epsilon``):
        (what is published, diagnostics computed from the raw votes)."""
        plan = self._release_plan()
        args = (votes, answered, self.teachers, self.threshold, self.sigma1, self.sigma2,
                plan["order"], plan["beta"], plan["sigma_s"], self.delta)  # fmt: skip

        def draw() -> torch.Tensor:
            generator = (
                None
                if self.secure_noise
                else torch.Generator().manual_seed(ctx.noise_seed(Stream.PATE_RELEASE))
            )
            z = float(standard_normal((1,), generator=generator, secure=self.secure_noise)[0])
            return torch.tensor([release(*args, z=z).rdp_noisy], dtype=torch.float64)

        noisy = float(ctx.privatized("pate-epsilon", draw)[0])
        exact = release(*args, z=0.0)
        a = plan["order"]
        eps = noisy + exact.release_rdp + math.log((a - 1) / a)
        eps -= (math.log(self.delta) + math.log(a)) / (a - 1)
        published = {
            "epsilon_data_dependent_published": max(0.0, eps),
            "rdp_published": noisy,
            "order": a,
            "beta": plan["beta"],
            "sigma_s": plan["sigma_s"],
            "release_rdp": exact.release_rdp,
            "mechanism": "GNSS (Papernot et al. 2018, Theorem 23): data-dependent RDP at "
            "the filter's order plus smooth sensitivity × σ_s × N(0, 1); its cost is "
            "reserved from the filter's budget",
        }
        diagnostics = {
            "rdp_data_dependent": exact.rdp_noisy,
            "smooth_sensitivity": exact.smooth_sensitivity,
            "noise_std": exact.noise_std,
        }
        return published, diagnostics


def _load_teacher_accuracy(folder: Path, start: int, size: int) -> torch.Tensor:
    """The stored accuracies of the teacher group starting at ``start`` (``size``
    teachers), NaN when the group's votes were stored without them."""
    path = folder / f"teacher-accuracy-{start}.pt"
    if not path.exists():
        return torch.full((size,), math.nan, dtype=torch.float64)
    return torch.load(path, weights_only=True).to(torch.float64)


def _rate(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def answer_diagnostics(
    pool_votes: np.ndarray,
    pool_labels: np.ndarray,
    answered: np.ndarray,
    answers: np.ndarray,
    num_classes: int,
) -> dict[str, Any]:
    """Statistics of the aggregation against the labels (outside the guarantee).

    pool_votes: raw vote histograms (M, K) of the whole query pool, in pool order;
    pool_labels: (M,) the true labels of the pool, ``ctx.diagnostic_labels`` (a canary's
    original label, not the planted one the teachers saw);
    answered: (C,) bool, whether each of the C considered queries (the first C of the
    pool, where the filter stopped) was answered; answers: (A,) the released labels of
    the answered ones; num_classes: K.

    Keys (accuracies and rates are fractions in [0, 1], null when their denominator is 0):
    ``queries_pool`` M, ``queries_considered`` C, ``queries_answered`` A;
    ``answer_rate`` A / C and ``answer_rate_pool`` A / M;
    ``label_accuracy_of_answers``: the released labels against ``pool_labels``;
    ``ensemble_accuracy_pool``: the noiseless ensemble (plurality of the raw votes, ties
    to the lowest class index) against ``pool_labels`` over the whole pool, and
    ``ensemble_accuracy_answered`` over the answered queries only;
    ``answer_histogram``: K counts of the released labels per class;
    ``answered_label_histogram``: K counts of ``pool_labels`` of the answered queries.
    """
    pool_votes = np.asarray(pool_votes)
    pool_labels = np.asarray(pool_labels, dtype=np.int64)
    answered = np.asarray(answered, dtype=bool)
    answers = np.asarray(answers, dtype=np.int64)
    m, considered, count = len(pool_votes), len(answered), int(answered.sum())
    if pool_votes.shape != (m, num_classes) or pool_labels.shape != (m,):
        raise ConfigError(
            f"pool_votes must be (M, {num_classes}) and pool_labels (M,), got "
            f"{pool_votes.shape} and {pool_labels.shape}"
        )
    if considered > m or len(answers) != count:
        raise ConfigError(f"{considered} considered of {m}, {len(answers)} answers for {count}")
    plurality = pool_votes.argmax(1) if m else np.zeros(0, np.int64)
    right = plurality == pool_labels
    on_answered = np.zeros(m, dtype=bool)
    on_answered[:considered] = answered
    answered_labels = pool_labels[on_answered]
    return {
        "queries_pool": m,
        "queries_considered": considered,
        "queries_answered": count,
        "answer_rate": _rate(count, considered),
        "answer_rate_pool": _rate(count, m),
        "label_accuracy_of_answers": float((answers == answered_labels).mean()) if count else None,
        "ensemble_accuracy_pool": float(right.mean()) if m else None,
        "ensemble_accuracy_answered": float(right[on_answered].mean()) if count else None,
        "answer_histogram": np.bincount(answers, minlength=num_classes).tolist(),
        "answered_label_histogram": np.bincount(answered_labels, minlength=num_classes).tolist(),
    }


def teacher_accuracy_summary(accuracy: torch.Tensor | np.ndarray) -> dict[str, Any]:
    """Each teacher's accuracy on the evaluation split (fractions in [0, 1]; NaN: not
    recorded, e.g. votes cached before accuracies were) as JSON keys:
    ``teacher_accuracy`` (list in teacher order, null where unknown) and
    ``teacher_accuracy_mean`` / ``_min`` / ``_max`` over the known ones (null if none)."""
    values = np.asarray(accuracy, dtype=np.float64)
    known = values[np.isfinite(values)]
    return {
        "teacher_accuracy": [float(v) if math.isfinite(v) else None for v in values],
        "teacher_accuracy_mean": float(known.mean()) if len(known) else None,
        "teacher_accuracy_min": float(known.min()) if len(known) else None,
        "teacher_accuracy_max": float(known.max()) if len(known) else None,
    }
