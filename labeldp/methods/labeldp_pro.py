"""labeldp-pro: DP-SGD's noisy gradient denoised by a projection onto gradients that the
public features alone determine (Ghazi et al., ICLR 2024; the ALTCONV variant of the
paper's tables). The step is :class:`labeldp.train.labeldp_pro.LabelDPProStep`.

Its ε is label DP under "replace one label": a label change moves one example's clipped
gradient anywhere in the ball of radius C, so the Poisson-subsampled Gaussian mechanism is
accounted under dp-accounting's REPLACE_ONE relation (a move of up to 2C, PLD), at δ.
The projection reads the model and the features of an independent batch, never a label:
post-processing. (DP-SGD's own ε, beside it in the tables, is for adding or removing an
example, which protects the features too.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ..errors import ConfigError
from ..options import EPSILON, SWITCH, MethodOptions, Number, option
from ..privacy import Neighbouring
from ..seeding import Stream
from ..train.labeldp_pro import LabelDPProStep, ProjectionBatches
from ..train.steps import GradientStep
from .base import RunCheck, RunContext
from .dpsgd import DPSGDMethod, DPSGDOptions, DPSGDPlan


@dataclass(frozen=True)
class LabelDPProOptions(DPSGDOptions):
    """Options of ``labeldp-pro``; see :class:`LabelDPPro`."""

    epsilon: float = option(kind=EPSILON, help="the budget ε at delta (replace one label)")
    projection_batch: int = option(
        64, kind=Number(int, 1), metavar="N2",
        help="examples of the alternative batch whose class gradients span the projection",
    )  # fmt: skip
    smoothing: float = option(
        0.75, kind=Number(float, 0.0, 1.0), metavar="LAMBDA",
        help="weight λ of the projection's coefficients against uniform ones (1: none)",
    )  # fmt: skip
    projection_steps: int = option(
        100, kind=Number(int, 1), metavar="S",
        help="accelerated projected-gradient iterations of the projection",
    )  # fmt: skip
    clip_vertices: bool = option(
        False, kind=SWITCH,
        help="clip the projection's class gradients to C like the private ones (the paper: no)",
    )  # fmt: skip


class LabelDPPro(DPSGDMethod):
    """LabelDP-Pro with the ALTCONV denoiser (the paper's tables).

    epsilon: the budget ε > 0 (replace one label, at ``delta``); noise calibrated to it
        unless ``noise_multiplier`` is given. delta: δ in (0, 1), default 1e-5.
    max_grad_norm: C > 0, the per-example clipping norm of the private gradient.
    projection_batch: n₂ ≥ 1 examples drawn uniformly (features only) at every step; the
        projection is onto the convex hull of their n₂·K class gradients.
    clip_vertices: clip those class gradients to C as the private gradients are (False:
        unclipped, the paper's; see labeldp.train.labeldp_pro for what each does).
    smoothing: λ in [0, 1]; the step uses λα + (1 − λ)/(n₂K) (the paper's 0.75).
    projection_steps: iterations of the projection (≥ 1).
    accountant: "pld" only. physical_batch_size, secure_noise: as for dp-sgd. The run's
    ``batch_size`` is the expected (Poisson) batch size of the private gradient.
    """

    name: ClassVar[str] = "labeldp-pro"
    Options: ClassVar[type[MethodOptions]] = LabelDPProOptions
    #: plain label DP (replace one label), not DP-SGD's add/remove ε it would inherit
    epsilon_meaning: ClassVar[str | None] = None
    _relation: ClassVar[Neighbouring] = Neighbouring.REPLACE_ONE_LABEL

    def __init__(self, *args: Any, **options: Any) -> None:
        super().__init__(*args, **options)
        if self.accountant != "pld":
            raise ConfigError(
                f"accountant must be 'pld' for labeldp-pro (its replace-one-label Gaussian is "
                f"read by dp-accounting's PLD only), got {self.accountant!r}"
            )

    def check(self, run: RunCheck) -> None:
        super().check(run)
        if self.projection_batch > run.num_examples:
            raise ConfigError(
                f"projection_batch must be at most the training examples ({run.num_examples}), "
                f"got {self.projection_batch}"
            )

    def _gradient_step(self, ctx: RunContext, plan: DPSGDPlan) -> GradientStep:
        images = ctx.train.images
        projection = ProjectionBatches(
            len(ctx.train.labels), self.projection_batch,
            lambda idx: ctx.normalize(images[idx.to(images.device)]),
            seed=ctx.noise_seed(Stream.LABELDP_PRO_PROJECTION), device=images.device,
        )  # fmt: skip
        return LabelDPProStep(
            super()._gradient_step(ctx, plan),
            projection,
            ctx.train.info.num_classes,
            smoothing=self.smoothing,
            projection_steps=self.projection_steps,
            clip_vertices=self.clip_vertices,
        )

    def _ledger_details(self, plan: DPSGDPlan) -> dict[str, Any]:
        return {
            "protects": "labels (features public)",
            "denoiser": {
                "kind": "altconv: convex hull of the class gradients of an independent batch",
                "clip_vertices": self.clip_vertices,
                "projection_batch": self.projection_batch,
                "smoothing": self.smoothing,
                "projection_steps": self.projection_steps,
            },
        }
