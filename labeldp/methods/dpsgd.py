"""dp-sgd: DP-SGD on the true labels, the baseline that protects features as well as labels."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..errors import ConfigError
from ..options import DELTA, EPSILON, POSITIVE, SWITCH, Choice, MethodOptions, Number, option
from ..privacy import LedgerEntry, Neighbouring, PrivacyLedger
from ..privacy.dpsgd_accounting import (
    ACCOUNTANTS,
    RELATION,
    calibrate_dpsgd_noise,
    dpsgd_epsilon,
    dpsgd_event,
    replace_one_bound,
)
from ..records import number_from_json, number_to_json
from ..seeding import Stream
from ..train import HardLabels
from ..train.dpsgd import DPSGDStep, check_per_example_model
from ..train.sampling import PoissonBatches
from ..train.steps import GradientStep
from .base import Method, MethodResult, RunCheck, RunContext


@dataclass(frozen=True)
class DPSGDPlan:
    """What a DP-SGD run does and what it costs, fixed before it trains.

    sample_rate: the Poisson sampling rate q = B / N, in (0, 1].
    steps: the number of noisy gradient steps T (≥ 1): epochs · ceil(N / B).
    noise_multiplier: σ > 0, the Gaussian noise's standard deviation over the clipping
        norm C.
    epsilon: the run's ε (≥ 0, finite) for adding or removing one example, at the
        method's δ, from the accountant: per example, features and label together.
    """

    sample_rate: float
    steps: int
    noise_multiplier: float
    epsilon: float

    def to_json(self) -> dict[str, Any]:
        return {
            "sample_rate": self.sample_rate,
            "steps": self.steps,
            "noise_multiplier": self.noise_multiplier,
            "epsilon": number_to_json(self.epsilon),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DPSGDPlan:
        return cls(
            sample_rate=data["sample_rate"],
            steps=data["steps"],
            noise_multiplier=data["noise_multiplier"],
            epsilon=number_from_json(data["epsilon"]),
        )


@dataclass(frozen=True)
class DPSGDOptions(MethodOptions):
    """Options of ``dp-sgd``; see :class:`DPSGDMethod`."""

    epsilon: float = option(kind=EPSILON, help="the budget ε at delta (add or remove one example)")
    delta: float = option(1e-5, kind=DELTA, help="δ of the budget")
    max_grad_norm: float = option(
        1.0, kind=POSITIVE, metavar="C", help="per-example L2 clipping norm C"
    )
    noise_multiplier: float | None = option(
        None,
        kind=POSITIVE,
        metavar="SIGMA",
        help="noise standard deviation / C (refused if its ε exceeds the budget)",
        none="calibrated so that ε reaches the budget",
    )
    accountant: str = option("pld", kind=Choice(ACCOUNTANTS), help="privacy accountant")
    physical_batch_size: int = option(
        256, kind=Number(int, 1), metavar="B", help="per-example gradients held in memory at once"
    )
    secure_noise: bool = option(
        False,
        kind=SWITCH,
        help="draw the gradient noise and the Poisson batches from OS entropy instead of "
        "the run seed",
    )


class DPSGDMethod(Method):
    """DP-SGD (Abadi et al. 2016) with Poisson sampling, flat clipping and Gaussian noise.

    The training configuration's ``batch_size`` is the *expected* (logical) batch size B:
    the sample rate is q = B / N and a run takes T = epochs · ceil(N / B) steps.

    epsilon: the budget ε > 0 (add/remove one example, at ``delta``); the run's ε never
        exceeds it. Without ``noise_multiplier`` the noise is calibrated to reach it.
    delta: δ in (0, 1), default 1e-5.
    max_grad_norm: C > 0, the per-example L2 clipping norm.
    noise_multiplier: σ > 0 to use instead of calibrating; refused if its ε exceeds the
        budget.
    accountant: "pld" (default) or "rdp".
    physical_batch_size: per-example gradients held at once (memory bound), ≥ 1.
    secure_noise: Gaussian noise and Poisson coins from OS entropy.
    """

    name: ClassVar[str] = "dp-sgd"
    Options: ClassVar[type[MethodOptions]] = DPSGDOptions
    #: How to read this method's ε beside label-DP methods (reports print it).
    epsilon_meaning: ClassVar[str] = (
        "ε is DP-SGD's for adding or removing one example (features and label together); "
        "for changing one label it implies (2ε, (1 + e^ε)·δ) by group privacy"
    )

    #: The relation the run's ε is stated for (labeldp.privacy.dpsgd_accounting.RELATIONS).
    _relation: ClassVar[Neighbouring] = RELATION

    def __init__(self, *args: Any, **options: Any) -> None:
        super().__init__(*args, **options)
        self._plans: dict[tuple[int, int, int], DPSGDPlan] = {}

    def plan(self, num_examples: int, batch_size: int, epochs: int) -> DPSGDPlan:
        """The sample rate q, the steps T, the noise multiplier σ and the run's ε for
        ``num_examples`` examples, expected batch ``batch_size`` and ``epochs`` (computed
        once per setting: :meth:`check` and :meth:`run` share it)."""
        key = (num_examples, batch_size, epochs)
        if key not in self._plans:
            self._plans[key] = self._plan(num_examples, batch_size, epochs)
        return self._plans[key]

    def _plan(self, num_examples: int, batch_size: int, epochs: int) -> DPSGDPlan:
        sampler = PoissonBatches(batch_size)
        try:
            q = sampler.sample_rate(num_examples)
        except ValueError as exc:
            raise ConfigError(f"batch_size: {exc}") from None
        steps = epochs * sampler.steps_per_epoch(num_examples)
        sigma = self.noise_multiplier
        relation = self._relation
        if sigma is None:
            sigma = calibrate_dpsgd_noise(
                self.epsilon, self.delta, q, steps, self.accountant, relation=relation
            )
        epsilon = dpsgd_epsilon(sigma, q, steps, self.delta, self.accountant, relation)
        if epsilon > self.epsilon and self.noise_multiplier is None:
            # Calibration promises ε ≤ the budget; should an accountant still disagree,
            # say what the user can change (they already left the noise to calibration).
            raise ConfigError(
                f"the noise multiplier calibrated to epsilon = {self.epsilon:g} ({sigma:.6g}) "
                f"gives ε = {epsilon:.6g} over {steps} steps at sample rate {q:.6g}, above the "
                "budget; ask for a larger epsilon, try the other accountant, or give "
                "noise_multiplier yourself"
            )
        if epsilon > self.epsilon:
            raise ConfigError(
                f"noise_multiplier {sigma} gives ε = {epsilon:.4f} over {steps} steps at sample "
                f"rate {q:.6g}, above the budget epsilon = {self.epsilon}; raise the noise, "
                "lower the epochs or the batch size, or omit noise_multiplier to calibrate"
            )
        return DPSGDPlan(sample_rate=q, steps=steps, noise_multiplier=sigma, epsilon=epsilon)

    def check(self, run: RunCheck) -> None:
        """Refuses, before the run folder is written, a model with batch statistics and a
        plan that cannot keep the budget (the calibration's own errors included), and mixup:
        a mixed example carries two examples' data, which per-example clipping does not
        bound, so the accounting would not hold."""
        if run.config.mixup_alpha > 0:
            raise ConfigError(
                f"mixup_alpha (--mixup) must be 0 for dp-sgd (mixing examples breaks the "
                f"per-example sensitivity its ε rests on), got {run.config.mixup_alpha}"
            )
        with torch.random.fork_rng(devices=[]):
            check_per_example_model(run.build_model())
        self.plan(run.num_examples, run.config.batch_size, run.config.epochs)

    def run(self, ctx: RunContext) -> MethodResult:
        model = ctx.build_model()
        check_per_example_model(model)
        n = len(ctx.train.labels)
        if ctx.train.images.shape[0] != n:
            raise RuntimeError("DP-SGD: images and labels disagree on the number of examples")
        plan = self.plan(n, ctx.config.batch_size, ctx.config.epochs)
        sampler = PoissonBatches(ctx.config.batch_size, secure=self.secure_noise)
        step = self._gradient_step(ctx, plan)
        if self.secure_noise and ctx.checkpoint_every != 1:
            # Secure noise cannot be replayed: epochs after the last checkpoint would be
            # redone with fresh noise on resume, and anything they reported (test
            # accuracy of an intermediate model) would be an unaccounted release. So a
            # secure run checkpoints every epoch, before it reports the epoch.
            ctx = dataclasses.replace(ctx, checkpoint_every=1)
        fit = ctx.fit(HardLabels(ctx.train.labels), model=model, step=step, sampler=sampler)
        # The accountant assumed exactly plan.steps steps: the ones of earlier sessions
        # (resumed from a checkpoint) plus the ones this session took.
        earlier = fit.resumed_from_epoch * sampler.steps_per_epoch(n)
        # A diverged run stops early: fewer steps than accounted are covered by the ε.
        if earlier + step.steps_taken != plan.steps and not fit.diverged:
            raise RuntimeError(
                f"DP-SGD took {earlier + step.steps_taken} steps, accounted {plan.steps}"
            )
        ledger = PrivacyLedger()
        ledger.record(
            LedgerEntry(
                mechanism=self.name,
                epsilon=plan.epsilon,
                delta=self.delta,
                examples=n,
                details={
                    "accountant": self.accountant,
                    "neighboring_relation": self._relation.value,
                    "event": {
                        "self_composed": plan.steps,
                        "poisson_sampled": plan.sample_rate,
                        "gaussian_noise_multiplier": plan.noise_multiplier,
                    },
                    "max_grad_norm": self.max_grad_norm,
                    "expected_batch_size": ctx.config.batch_size,
                    "epsilon_budget": self.epsilon,
                    **self._ledger_details(plan),
                    "secure_noise": self.secure_noise,
                    "noise_source": "os entropy (noise and sampling)"
                    if self.secure_noise
                    else "seeded from the run seed and configuration",
                },
                relation=self._relation,
                event=dpsgd_event(plan.noise_multiplier, plan.sample_rate, plan.steps),
                event_note="exact: the Poisson-sampled Gaussian mechanism composed over the "
                "planned steps (ε is accounted from this event)",
            )
        )
        return MethodResult(fit=fit, ledger=ledger)

    def _gradient_step(self, ctx: RunContext, plan: DPSGDPlan) -> GradientStep:
        """The run's gradient step (DP-SGD's; subclasses wrap it)."""
        return DPSGDStep(
            self.max_grad_norm,
            plan.noise_multiplier,
            expected_batch_size=ctx.config.batch_size,
            physical_batch_size=self.physical_batch_size,
            secure_noise=self.secure_noise,
            seed=ctx.noise_seed(Stream.DPSGD_NOISE),
        )

    def _ledger_details(self, plan: DPSGDPlan) -> dict[str, Any]:
        """What the ledger entry says besides the event: DP-SGD's replace-one-label bound
        by group privacy, and what it protects."""
        eps_replace, delta_replace = replace_one_bound(plan.epsilon, self.delta)
        return {
            "replace_one_bound": {"epsilon": eps_replace, "delta": delta_replace},
            "protects": "features and labels",
        }
