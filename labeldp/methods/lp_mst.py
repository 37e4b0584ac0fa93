"""LP-MST: multi-stage training with RRWithPrior (Ghazi et al. 2021, Algorithm 3).

The training set is split at random, without looking at labels, into T disjoint parts.
Stage 1 randomizes the labels of part 1 with RR and trains M₁ on them. Stage t ≥ 2 takes
as prior for x in part t the softmax of M_{t−1}(x) / temperature, randomizes part t with
RRWithPrior, and trains M_t (initialised from M_{t−1}) on every label randomized so far,
dropping earlier labels that fall outside the current top-k* set (the paper's
implementation). Each label is randomized exactly once by an ε-DP randomizer whose prior
does not depend on it, so the whole run is ε-label-DP (parallel composition).

**Prior guard** (``calibration_share`` > 0). A poor M_{t−1} (say, collapsed onto one
class) makes RRWithPrior worse than plain RR. So a small calibration slice of part 1,
chosen at random without looking at labels, is held out of stage-1 *training* (its RR
labels are still drawn and released with the rest of part 1, once, and train the later
stages like the rest of part 1). Before stage t randomizes anything, each candidate
prior — softmax(M_{t−1}(x)/τ) for τ in the configured temperature and
:data:`GUARD_TEMPERATURES`, and the uniform prior (plain RR) — is scored on the slice by
the unbiased estimate of the probability that RRWithPrior releases the true label
(:meth:`~labeldp.mechanisms.RRWithPrior.release_estimates`), computed from the slice's
stage-1 RR labels ỹ alone; stage t uses the best one, for its randomization and for the
drop-outside-top-k filter (uniform: nothing is dropped). The choice is in
``method_details["prior_guard"]``.

Why the choice costs no privacy: it is a function of public features, of M_{t−1} and of
the stage-1 RR outputs, all of which are outputs already released (or post-processing of
them); it never reads a true label. Choosing a prior for part t from them is therefore
post-processing of earlier releases, and each label of part t is still randomized exactly
once by RRWithPrior at ε with a prior that does not depend on that label (the labels of
part t enter nothing before their own randomization). The ledger is the same as without
the guard: one parallel entry per stage, ε in all. The uniform choice runs RRWithPrior
with the uniform prior, which is exactly RR (k* = K; see
:meth:`~labeldp.mechanisms.RRWithPrior.top_sets`).

The estimate is unbiased for stage 2, whose prior M₁ never trained on the slice. From
stage 3 on, M_{t−1} has trained on the slice's RR labels, so its top sets depend on ỹ and
the model priors' estimates are biased upwards (the uniform one stays exact): the guard
there still protects against a poor model, with less margin.

**Per-stage mixup** (``stage_mixup``): the mixup α of each stage (the paper's CIFAR-10
runs use (16, 8), (8, 8), (8, 4), (4, 4) at ε = 1, 2, 4, 8); None: the run's
``mixup_alpha`` in every stage.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..data import random_partition
from ..data.dataset import _part_sizes
from ..errors import ConfigError
from ..mechanisms import RandomizedResponse, RRWithPrior
from ..options import EPSILON, POSITIVE, SWITCH, Choice, MethodOptions, Number, Numbers, option
from ..privacy import PrivacyLedger
from ..seeding import Stream, derive_seed
from ..train import FitResult, HardLabels, TrainConfig, predict_logits
from .base import Method, MethodResult, RunCheck, RunContext
from .rr import LEARNING, LEARNING_OPTION_HELP, rr_targets

#: The paper's CIFAR-10 settings by ε: (share of the data in stage 1, prior temperature).
PAPER_SETTINGS: dict[float, tuple[float, float]] = {
    1.0: (0.8, 0.6),
    2.0: (0.7, 0.5),
    4.0: (0.6, 0.5),
    8.0: (0.6, 0.5),
}

#: Prior temperatures the guard tries besides the configured one (> 0).
GUARD_TEMPERATURES: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0)

#: calibration_share must lie in [0, CALIBRATION_SHARE_LIMIT).
CALIBRATION_SHARE_LIMIT = 0.5


def paper_setting(epsilon: float) -> tuple[float, float]:
    """(stage-1 share, temperature) of the paper's table at the ε nearest on a log scale."""
    grid = sorted(PAPER_SETTINGS)
    logs = [math.log(e) for e in grid]
    i = bisect.bisect_left(logs, math.log(epsilon))
    candidates = [j for j in (i - 1, i) if 0 <= j < len(grid)]
    best = min(candidates, key=lambda j: abs(logs[j] - math.log(epsilon)))
    return PAPER_SETTINGS[grid[best]]


def guard_temperatures(configured: float) -> list[float]:
    """The model-prior temperatures the guard scores: ``configured`` first, then
    :data:`GUARD_TEMPERATURES` without repeats."""
    out = [float(configured)]
    out += [t for t in GUARD_TEMPERATURES if all(abs(t - o) > 1e-12 for o in out)]
    return out


def choose_prior(
    logits: torch.Tensor,
    rr_labels: torch.Tensor,
    epsilon: float,
    temperatures: Sequence[float],
) -> tuple[float | None, dict[str, Any]]:
    """The guard's choice of prior for the next stage, from the calibration slice alone.

    logits: the previous stage's model on the slice, (m, K), m ≥ 1. rr_labels: the
    slice's stage-1 RR outputs at ``epsilon`` (int64 (m,)); the true labels are never
    used. temperatures: model-prior temperatures to score (each > 0).

    Each candidate (softmax(logits/τ) for each τ, then the uniform prior) is scored by
    the mean over the slice of :meth:`RRWithPrior.release_estimates`, an unbiased estimate
    of the probability that RRWithPrior with that prior releases the true label when the
    model did not train on the slice (see the module docstring for later stages). The
    highest wins; ties go to the uniform prior, then to the earlier candidate.

    Returns ``(temperature, record)``: the chosen τ, or None for the uniform prior; the
    record holds per candidate its ``prior`` ("model" or "uniform"), ``temperature``,
    ``estimate``, ``std_error`` (sample standard deviation / √m; 0 for m = 1) and
    ``mean_set_size`` (mean k*), then ``choice`` (the winning candidate's prior and
    temperature) and ``calibration_examples`` (m)."""
    mechanism = RRWithPrior(epsilon)
    m, num_classes = logits.shape
    if m < 1:
        raise ConfigError("the prior guard needs a calibration slice of at least one example")

    def score(prior: torch.Tensor) -> tuple[float, float, float]:
        values = mechanism.release_estimates(rr_labels, prior)
        error = float(values.std(unbiased=True)) / math.sqrt(m) if m > 1 else 0.0
        return float(values.mean()), error, float(mechanism.optimal_k(prior).double().mean())

    candidates: list[dict[str, Any]] = []
    for tau in temperatures:
        estimate, error, size = score(torch.softmax(logits.double() / tau, dim=1))
        candidates.append(
            {
                "prior": "model",
                "temperature": float(tau),
                "estimate": estimate,
                "std_error": error,
                "mean_set_size": size,
            }  # fmt: skip
        )
    uniform = torch.full((m, num_classes), 1.0 / num_classes, dtype=torch.float64)
    estimate, error, size = score(uniform.to(logits.device))
    candidates.append(
        {
            "prior": "uniform",
            "temperature": None,
            "estimate": estimate,
            "std_error": error,
            "mean_set_size": size,
        }  # fmt: skip
    )
    best = candidates[-1]  # the uniform prior unless a model prior does strictly better
    for candidate in candidates[:-1]:
        if candidate["estimate"] > best["estimate"]:
            best = candidate
    record = {
        "candidates": candidates,
        "choice": {"prior": best["prior"], "temperature": best["temperature"]},
        "calibration_examples": m,
    }
    return best["temperature"], record


@dataclass(frozen=True)
class StageOptions(MethodOptions):
    """The options LP-MST and LP-2ST share; see :class:`LPMST`. ``stage_fractions`` and
    ``prior_temperature`` left None become the paper's values at the nearest ε."""

    epsilon: float = option(kind=EPSILON, help="ε per label (replace one label)")
    stage_fractions: list[float] | None = option(
        None,
        kind=Numbers(0, low_open=True, note="summing to 1"),
        metavar="F1,F2,...",
        help="share of the training set in each stage (one per stage, summing to 1)",
        none="the paper's stage-1 share at the nearest ε, the rest split equally",
    )
    prior_temperature: float | None = option(
        None,
        kind=POSITIVE,
        help="temperature of the previous stage's model prior",
        none="the paper's at the nearest ε",
    )
    drop_outside_topk: bool = option(
        True,
        kind=SWITCH,
        help="drop earlier-stage labels outside the current top-k* set (the paper's)",
    )
    secure_noise: bool = option(
        False, kind=SWITCH, help="draw the label noise from OS entropy instead of the run seed"
    )
    calibration_share: float = option(
        0.05,
        kind=Number(float, 0, CALIBRATION_SHARE_LIMIT, high_open=True),
        metavar="SHARE",
        help="share of stage 1 held out of its training to choose each later stage's prior "
        "on the released RR labels (0: no guard)",
    )
    stage_mixup: list[float] | None = option(
        None,
        kind=Numbers(0),
        metavar="A1,A2,...",
        help="mixup α of each stage (0: no mixup in that stage)",
        none="the run's mixup α in every stage",
    )
    learning: str = option(
        "plain",
        kind=Choice(LEARNING),
        help="how stage 1 learns from its RR labels: " + LEARNING_OPTION_HELP.split(": ", 1)[1],
    )

    @property
    def num_stages(self) -> int:
        return getattr(self, "stages", 2)

    def validate(self) -> None:
        stages = self.num_stages
        share, temperature = paper_setting(self.epsilon)
        if self.stage_fractions is None:
            rest = (1.0 - share) / (stages - 1)
            self._set("stage_fractions", [share] + [rest] * (stages - 1))
        elif len(self.stage_fractions) != stages or abs(sum(self.stage_fractions) - 1) > 1e-6:
            raise ConfigError(
                f"stage_fractions must be {stages} numbers > 0 summing to 1, "
                f"got {list(self.stage_fractions)}"
            )
        if self.prior_temperature is None:
            self._set("prior_temperature", float(temperature))
        if self.stage_mixup is not None and len(self.stage_mixup) != stages:
            raise ConfigError(
                f"stage_mixup must be {stages} finite numbers ≥ 0, the mixup α of each "
                f"stage (0: no mixup), or None for the run's mixup_alpha; got {self.stage_mixup!r}"
            )


@dataclass(frozen=True)
class LPMSTOptions(StageOptions):
    """Options of ``lp-mst``: :class:`StageOptions` and the number of stages."""

    stages: int = option(2, kind=Number(int, 2), help="number of stages T")


class LPMST(Method):
    """LP-MST with T stages.

    epsilon: ε > 0 per label. stages: T ≥ 2. stage_fractions: the share of the training
        set in each stage (T positive numbers summing to 1); default: the paper's stage-1
        share at the nearest ε, the rest split equally. prior_temperature: > 0; default
        the paper's. drop_outside_topk: drop earlier-stage labels outside the current
        top-k* set. secure_noise: OS entropy instead of the run seed.
        learning: how stage 1 learns from its RR labels, as RR's ``learning`` ("plain",
        "forward" correction with RR's channel, or the "posterior"; free post-processing);
        later stages, whose RRWithPrior labels are far less noisy, train on them plainly.
    calibration_share: share of stage 1's part held out of stage-1 training for the prior
        guard, in [0, 0.5); 0 turns the guard off (every stage t ≥ 2 then uses the model
        prior at ``prior_temperature``). With a share > 0 the slice has
        max(1, round(share · |part 1|)) examples (see the module docstring).
    stage_mixup: T numbers ≥ 0, the mixup α of each stage (0: no mixup in that stage), or
        None: every stage uses the run's ``mixup_alpha``.
    Every stage trains for the run's epochs on the labels it has.
    """

    name: ClassVar[str] = "lp-mst"
    Options: ClassVar[type[MethodOptions]] = LPMSTOptions

    def __init__(self, *args: Any, **options: Any) -> None:
        super().__init__(*args, **options)
        self.stages: int = self.opts.num_stages

    def calibration_size(self, stage1: int) -> int:
        """Examples of the calibration slice for a stage-1 part of ``stage1`` examples:
        0 without the guard, else max(1, round(calibration_share · stage1))."""
        if self.calibration_share == 0:
            return 0
        return max(1, round(self.calibration_share * stage1))

    def calibration_positions(self, seed: int, stage1: int) -> torch.Tensor:
        """Positions in stage 1's part (0..stage1−1) of the calibration slice: a sorted
        CPU int64 tensor of :meth:`calibration_size` positions, chosen at random from
        (``seed``, ``stage1``) alone, never from labels."""
        size = self.calibration_size(stage1)
        generator = torch.Generator().manual_seed(derive_seed(seed, Stream.LPMST_SPLIT, 1))
        return torch.randperm(stage1, generator=generator)[:size].sort().values

    def check(self, run: RunCheck) -> None:
        """Refuses, before the run folder is written, stages that would get no example,
        and a calibration slice that leaves stage 1 nothing to train on."""
        n = run.num_examples
        try:
            sizes = _part_sizes(n, self.stage_fractions)
        except ConfigError:
            exact = [f * n for f in self.stage_fractions]
            small = sum(1 for e in exact if e < 1)
            raise ConfigError(
                f"{self.stages} stages over {n} training examples leave some stages without "
                f"an example ({small} of the stage fractions give less than one example, "
                f"smallest {min(self.stage_fractions):.3g}); use fewer stages (--stages) or "
                "larger --stage-fractions"
            ) from None
        if self.calibration_size(sizes[0]) >= sizes[0]:
            raise ConfigError(
                f"calibration_share {self.calibration_share:g} holds out all {sizes[0]} "
                "examples of stage 1, leaving none to train on; use calibration_share 0 "
                "(no guard) or a larger stage 1"
            )

    def _stage_config(self, ctx: RunContext, stage: int) -> TrainConfig | None:
        """Stage ``stage``'s training configuration (None: the run's own)."""
        if self.stage_mixup is None:
            return None
        return dataclasses.replace(ctx.config, mixup_alpha=self.stage_mixup[stage - 1])

    def _logits(
        self, ctx: RunContext, model: torch.nn.Module, indices: torch.Tensor
    ) -> torch.Tensor:
        return predict_logits(
            model, ctx.train.images[indices], ctx.normalize, ctx.config.eval_batch_size
        )

    def _prior(
        self,
        ctx: RunContext,
        model: torch.nn.Module,
        indices: torch.Tensor,
        temperature: float | None = None,
    ) -> torch.Tensor:
        """softmax(model(x)/τ) for the examples ``indices``: float64 (N, K); τ defaults
        to ``prior_temperature``."""
        tau = self.prior_temperature if temperature is None else temperature
        return torch.softmax(self._logits(ctx, model, indices).double() / tau, dim=1)

    def run(self, ctx: RunContext) -> MethodResult:
        n, num_classes = len(ctx.train), ctx.train.info.num_classes
        parts = [
            p.to(ctx.train.device)
            for p in random_partition(
                n, self.stage_fractions, derive_seed(ctx.config.seed, Stream.LPMST_SPLIT)
            )
        ]
        ledger = PrivacyLedger()
        rr = RandomizedResponse(self.epsilon, num_classes, secure=self.secure_noise)
        with_prior = RRWithPrior(self.epsilon, secure=self.secure_noise)
        labels = ctx.train.labels

        def generator(stage: int) -> torch.Generator | None:  # one stream per stage
            return None if self.secure_noise else ctx.generator(Stream.LPMST_NOISE, stage)

        # Stage 1: plain RR on all of part 1 (the calibration slice included), trained on
        # part 1 without the slice.
        noisy = ctx.privatized("stage1", lambda: rr.privatize(labels[parts[0]], generator(1)))
        ledger.record(
            rr.ledger_entry(len(parts[0]), composition="parallel", group="lp-mst", stage=1)
        )
        calibration = self.calibration_positions(ctx.config.seed, len(parts[0])).to(parts[0].device)
        trains = torch.ones(len(parts[0]), dtype=torch.bool, device=parts[0].device)
        trains[calibration] = False
        calibration_indices, calibration_noisy = parts[0][calibration], noisy[calibration]
        seen, seen_noisy = parts[0], noisy
        fit: FitResult = ctx.fit(
            rr_targets(self.learning, noisy[trains], rr),
            name="stage1",
            subset=parts[0][trains],
            config=self._stage_config(ctx, 1),
        )
        stage_fits = [fit]
        stage_sizes = [int(trains.sum())]
        guard: list[dict[str, Any]] = []

        for t in range(2, self.stages + 1):
            part = parts[t - 1]
            previous = fit.eval_model
            temperature: float | None = self.prior_temperature
            if len(calibration):
                temperature, record = choose_prior(
                    self._logits(ctx, previous, calibration_indices),
                    calibration_noisy,
                    self.epsilon,
                    guard_temperatures(self.prior_temperature),
                )
                guard.append({"stage": t, **record})
            if temperature is None:  # uniform: RRWithPrior is exactly RR (k* = K)
                prior = torch.full(
                    (len(part), num_classes), 1.0 / num_classes, dtype=torch.float64,
                    device=part.device,
                )  # fmt: skip
            else:
                prior = self._prior(ctx, previous, part, temperature)
            draw = lambda part=part, prior=prior, t=t: with_prior.privatize(  # noqa: E731
                labels[part], prior, generator(t)
            )
            noisy = ctx.privatized(f"stage{t}", draw)
            ledger.record(
                with_prior.ledger_entry(len(part), composition="parallel", group="lp-mst", stage=t)
            )
            keep_seen = torch.ones_like(seen, dtype=torch.bool)
            if self.drop_outside_topk and temperature is not None:
                keep_seen = with_prior.in_top_set(
                    seen_noisy, self._prior(ctx, previous, seen, temperature)
                )
            subset = torch.cat([seen[keep_seen], part])
            subset_labels = torch.cat([seen_noisy[keep_seen], noisy])
            model = ctx.build_model()
            model.load_state_dict(previous.state_dict())
            fit = ctx.fit(
                HardLabels(subset_labels),
                name=f"stage{t}",
                subset=subset,
                model=model,
                config=self._stage_config(ctx, t),
            )
            stage_fits.append(fit)
            stage_sizes.append(len(subset))
            seen, seen_noisy = torch.cat([seen, part]), torch.cat([seen_noisy, noisy])
        # The run's cost and record cover every stage, not only the last model's.
        fit.extra["stage_training_sizes"] = stage_sizes
        fit.extra["stage_histories"] = [[e.to_json() for e in f.history] for f in stage_fits]
        fit.extra["calibration_examples"] = len(calibration)
        fit.extra["prior_guard"] = guard if len(calibration) else None
        fit.extra["stage_mixup"] = (
            self.stage_mixup
            if self.stage_mixup is not None
            else [ctx.config.mixup_alpha] * self.stages
        )
        fit.train_seconds = sum(f.train_seconds for f in stage_fits)
        fit.eval_seconds = sum(f.eval_seconds for f in stage_fits)
        return MethodResult(fit=fit, ledger=ledger)


@dataclass(frozen=True)
class LP2STOptions(StageOptions):
    """Options of ``lp-2st``: :class:`StageOptions` with two stages."""


class LP2ST(LPMST):
    """LP-2ST: LP-MST with two stages, the common configuration (options as
    :class:`LPMST`'s, without ``stages``)."""

    name: ClassVar[str] = "lp-2st"
    Options: ClassVar[type[MethodOptions]] = LP2STOptions
