"""LP-MST: multi-stage training with RRWithPrior (Ghazi et al. 2021, Algorithm 3).

The training set is split at random, without looking at labels, into T disjoint parts.
Stage 1 randomizes the labels of part 1 with RR and trains M₁ on them. Stage t ≥ 2 takes
as prior for x in part t the softmax of M_{t−1}(x) / temperature, randomizes part t with
RRWithPrior, and trains M_t (initialised from M_{t−1}) on every label randomized so far,
dropping earlier labels that fall outside the current top-k* set (the paper's
implementation). Each label is randomized exactly once by an ε-DP randomizer whose prior
does not depend on it, so the whole run is ε-label-DP (parallel composition).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from ..data import random_partition
from ..data.dataset import _part_sizes
from ..errors import ConfigError, check_int
from ..mechanisms import RandomizedResponse, RRWithPrior
from ..mechanisms.validation import check_epsilon
from ..privacy import PrivacyLedger
from ..seeding import Stream, derive_seed
from ..train import FitResult, HardLabels, predict_logits
from .base import MethodResult, RunCheck, RunContext

#: The paper's CIFAR-10 settings by ε: (share of the data in stage 1, prior temperature).
PAPER_SETTINGS: dict[float, tuple[float, float]] = {
    1.0: (0.8, 0.6),
    2.0: (0.7, 0.5),
    4.0: (0.6, 0.5),
    8.0: (0.6, 0.5),
}


def paper_setting(epsilon: float) -> tuple[float, float]:
    """(stage-1 share, temperature) of the paper's table at the ε nearest on a log scale."""
    grid = sorted(PAPER_SETTINGS)
    logs = [math.log(e) for e in grid]
    i = bisect.bisect_left(logs, math.log(epsilon))
    candidates = [j for j in (i - 1, i) if 0 <= j < len(grid)]
    best = min(candidates, key=lambda j: abs(logs[j] - math.log(epsilon)))
    return PAPER_SETTINGS[grid[best]]


class LPMST:
    """LP-MST with T stages.

    epsilon: ε > 0 per label. stages: T ≥ 2. stage_fractions: the share of the training
        set in each stage (T positive numbers summing to 1); default: the paper's stage-1
        share at the nearest ε, the rest split equally. prior_temperature: > 0; default
        the paper's. drop_outside_topk: drop earlier-stage labels outside the current
        top-k* set. secure_noise: OS entropy instead of the run seed.
    Every stage trains for the run's epochs on the labels it has.
    """

    name: ClassVar[str] = "lp-mst"

    def __init__(
        self,
        epsilon: float,
        stages: int = 2,
        stage_fractions: Sequence[float] | None = None,
        prior_temperature: float | None = None,
        drop_outside_topk: bool = True,
        secure_noise: bool = False,
    ) -> None:
        self.epsilon = check_epsilon(epsilon)
        check_int("stages", stages, 2)
        share, temperature = paper_setting(self.epsilon)
        if stage_fractions is None:
            rest = (1.0 - share) / (stages - 1)
            stage_fractions = [share] + [rest] * (stages - 1)
        fractions = [float(f) for f in stage_fractions]
        if (
            len(fractions) != stages
            or any(not f > 0 for f in fractions)
            or abs(sum(fractions) - 1) > 1e-6
        ):
            raise ConfigError(
                f"stage_fractions must be {stages} numbers > 0 summing to 1, "
                f"got {list(stage_fractions)}"
            )
        self.stages = stages
        self.stage_fractions = fractions
        self.prior_temperature = float(
            temperature if prior_temperature is None else prior_temperature
        )
        if not (math.isfinite(self.prior_temperature) and self.prior_temperature > 0):
            raise ConfigError(
                f"prior_temperature must be a finite number > 0, got {prior_temperature}"
            )
        self.drop_outside_topk = bool(drop_outside_topk)
        self.secure_noise = bool(secure_noise)

    def options(self) -> dict[str, Any]:
        return {
            "epsilon": self.epsilon,
            "stages": self.stages,
            "stage_fractions": self.stage_fractions,
            "prior_temperature": self.prior_temperature,
            "drop_outside_topk": self.drop_outside_topk,
            "secure_noise": self.secure_noise,
        }

    def check(self, run: RunCheck) -> None:
        """Refuses, before the run folder is written, stages that would get no example."""
        n = run.num_examples
        try:
            _part_sizes(n, self.stage_fractions)
        except ConfigError:
            exact = [f * n for f in self.stage_fractions]
            small = sum(1 for e in exact if e < 1)
            raise ConfigError(
                f"{self.stages} stages over {n} training examples leave some stages without "
                f"an example ({small} of the stage fractions give less than one example, "
                f"smallest {min(self.stage_fractions):.3g}); use fewer stages (--stages) or "
                "larger --stage-fractions"
            ) from None

    def _prior(
        self, ctx: RunContext, model: torch.nn.Module, indices: torch.Tensor
    ) -> torch.Tensor:
        logits = predict_logits(
            model, ctx.train.images[indices], ctx.normalize, ctx.config.eval_batch_size
        )
        return torch.softmax(logits.double() / self.prior_temperature, dim=1)

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

        # Stage 1: plain RR on part 1.
        noisy = ctx.privatized("stage1", lambda: rr.privatize(labels[parts[0]], generator(1)))
        ledger.record(
            rr.ledger_entry(len(parts[0]), composition="parallel", group="lp-mst", stage=1)
        )
        seen, seen_noisy = parts[0], noisy
        fit: FitResult = ctx.fit(HardLabels(noisy), name="stage1", subset=parts[0])
        stage_fits = [fit]
        stage_sizes = [len(parts[0])]

        for t in range(2, self.stages + 1):
            part = parts[t - 1]
            previous = fit.eval_model
            prior = self._prior(ctx, previous, part)
            draw = lambda part=part, prior=prior, t=t: with_prior.privatize(  # noqa: E731
                labels[part], prior, generator(t)
            )
            noisy = ctx.privatized(f"stage{t}", draw)
            ledger.record(
                with_prior.ledger_entry(len(part), composition="parallel", group="lp-mst", stage=t)
            )
            keep_seen = torch.ones_like(seen, dtype=torch.bool)
            if self.drop_outside_topk:
                keep_seen = with_prior.in_top_set(seen_noisy, self._prior(ctx, previous, seen))
            subset = torch.cat([seen[keep_seen], part])
            subset_labels = torch.cat([seen_noisy[keep_seen], noisy])
            model = ctx.build_model()
            model.load_state_dict(previous.state_dict())
            fit = ctx.fit(HardLabels(subset_labels), name=f"stage{t}", subset=subset, model=model)
            stage_fits.append(fit)
            stage_sizes.append(len(subset))
            seen, seen_noisy = torch.cat([seen, part]), torch.cat([seen_noisy, noisy])
        # The run's cost and record cover every stage, not only the last model's.
        fit.extra["stage_training_sizes"] = stage_sizes
        fit.extra["stage_histories"] = [f.history for f in stage_fits]
        fit.train_seconds = sum(f.train_seconds for f in stage_fits)
        fit.eval_seconds = sum(f.eval_seconds for f in stage_fits)
        return MethodResult(fit=fit, ledger=ledger)


class LP2ST(LPMST):
    """LP-2ST: LP-MST with two stages, the common configuration."""

    name: ClassVar[str] = "lp-2st"

    def __init__(
        self,
        epsilon: float,
        stage_fractions: Sequence[float] | None = None,
        prior_temperature: float | None = None,
        drop_outside_topk: bool = True,
        secure_noise: bool = False,
    ) -> None:
        super().__init__(
            epsilon, 2, stage_fractions, prior_temperature, drop_outside_topk, secure_noise
        )
