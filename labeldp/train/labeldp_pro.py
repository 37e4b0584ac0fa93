"""LabelDP-Pro's gradient step: DP-SGD's noisy gradient projected onto the convex hull of
gradients that the features alone determine (Ghazi et al., ICLR 2024, Algorithm 1 with
the ALTCONV denoiser, the one of the paper's tables).

Per step t:

1. The private part is DP-SGD's (:class:`~labeldp.train.dpsgd.DPSGDStep`): a Poisson batch
   I^G (rate q), each example's gradient of the cross-entropy at its *true* label clipped
   to L2 norm C, the sum plus N(0, σ²C²) noise, divided by the expected batch size:
   g̃ = (Σ ḡᵢ + N(0, σ²C²I)) / (qN).
2. An *alternative* batch I^P of ``projection_batch`` n₂ examples is drawn uniformly
   without replacement, independently of I^G (its own seeded stream), and its features
   only are read: the vertices are G = [∇θ ℓ(θ, (xᵢ, κ))] for i ∈ I^P and every class κ
   (n₂·K vectors, unclipped, as in the paper). No label is read, and I^P does not depend
   on I^G, so the projection is post-processing and Poisson amplification still holds.
3. α = argmin over the simplex Δ (n₂·K coordinates) of ‖Gα − g̃‖² (:func:`project_onto_hull`,
   accelerated projected gradient with the sort-based simplex projection of Wang &
   Carreira-Perpiñán 2013), smoothed towards the uniform weights (the paper's §3.3,
   λ = 0.75 by default): α̃ = λα + (1 − λ)/(n₂K), and the step uses ĝ = Gα̃.

Privacy (the caller's accounting): neighbouring datasets differ in one example's label
(replace one label); the example's clipped gradient moves anywhere within the ball of
radius C, so the noisy sum's mean moves by at most 2C: dp-accounting's REPLACE_ONE
reading of the Poisson-subsampled Gaussian (labeldp.privacy.dpsgd_accounting with
``relation`` "replace one label"). Units: C in the gradient's L2 norm; σ per step,
relative to C; n₂ examples.

Cost: the vertices are materialised, (n₂·K) × P floats for P parameters (per-example
gradients of n₂·K (example, class) pairs through :func:`~labeldp.train.per_example.
per_example_gradients`, in chunks), then each projection iteration is two products with
that matrix. For the small models LabelDP-Pro targets (tens of thousands of parameters;
convolutions cost hundreds of multiply-adds per parameter) this is cheaper than the
paper's Jacobian-vector / vector-Jacobian products, which run the network twice per
iteration.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import ClassVar

import torch
from torch import nn

from ..errors import ConfigError
from ..seeding import Stream, derive_seed
from .dpsgd import DPSGDStep
from .per_example import exact_float32, per_example_gradients
from .steps import GradientStep, StepOutput
from .targets import TargetFn


def simplex_projection(v: torch.Tensor) -> torch.Tensor:
    """The Euclidean projection of the vector ``v`` (m,) onto the probability simplex
    {α ≥ 0, Σα = 1} (Wang & Carreira-Perpiñán 2013: sort, find the threshold, clip)."""
    if v.dim() != 1 or v.numel() == 0:
        raise ConfigError(f"v must be a non-empty vector, got shape {tuple(v.shape)}")
    u, _ = torch.sort(v, descending=True)
    cumulative = torch.cumsum(u, 0) - 1
    ranks = torch.arange(1, v.numel() + 1, device=v.device, dtype=v.dtype)
    rho = int(torch.nonzero(u - cumulative / ranks > 0).max())
    theta = cumulative[rho] / (rho + 1)
    return torch.clamp(v - theta, min=0)


def project_onto_hull(
    vertices: torch.Tensor, target: torch.Tensor, steps: int = 100
) -> torch.Tensor:
    """The weights α (m,) on the simplex minimising ‖αᵀV − g‖² for the m vertices
    ``vertices`` V (m, P) and the point ``target`` g (P,): accelerated projected gradient
    (FISTA) for ``steps`` ≥ 1 iterations from the uniform weights, step 1/L with L = 2‖V‖₂²
    from 30 power iterations (times 1.01). float64 inside."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps must be an integer ≥ 1, got {steps!r}")
    if vertices.dim() != 2 or target.shape != vertices.shape[1:]:
        raise ConfigError(
            f"vertices (m, P) and target (P,) disagree: {tuple(vertices.shape)}, "
            f"{tuple(target.shape)}"
        )
    V = vertices.double()
    g = target.to(V)
    m = V.shape[0]
    x = torch.randn(m, dtype=V.dtype, generator=torch.Generator().manual_seed(0)).to(V.device)
    for _ in range(30):
        x = V @ (V.T @ x)
        norm = torch.linalg.vector_norm(x)
        if norm == 0:
            break
        x = x / norm
    lipschitz = 2 * float(torch.linalg.vector_norm(V.T @ x)) ** 2 * 1.01
    alpha = torch.full((m,), 1.0 / m, dtype=V.dtype, device=V.device)
    if lipschitz == 0:  # every vertex is 0: any weights are optimal
        return alpha
    y, t = alpha, 1.0
    for _ in range(steps):
        gradient = 2 * (V @ (V.T @ y - g))
        new = simplex_projection(y - gradient / lipschitz)
        t_next = (1 + math.sqrt(1 + 4 * t * t)) / 2
        y = new + ((t - 1) / t_next) * (new - alpha)
        alpha, t = new, t_next
    return alpha


def class_gradients(
    model: nn.Module, inputs: torch.Tensor, num_classes: int, chunk: int = 256
) -> torch.Tensor:
    """The gradients ∇θ ℓ(θ, (xᵢ, κ)) of the cross-entropy for every example of
    ``inputs`` (n, ...) and every class κ < ``num_classes``, flattened over the trainable
    parameters in ``named_parameters`` order: (n·K, P) float32, row i·K + κ. Reads no
    label. ``chunk``: (example, class) pairs per vmap call."""
    n = inputs.shape[0]
    pairs = inputs.repeat_interleave(num_classes, dim=0)
    classes = torch.arange(num_classes, device=inputs.device).repeat(n)
    rows = []
    for start in range(0, n * num_classes, chunk):
        grads, _, _ = per_example_gradients(
            model, pairs[start : start + chunk], classes[start : start + chunk]
        )
        rows.append(torch.cat([g.flatten(1).float() for g in grads.values()], dim=1))
    return torch.cat(rows)


class ProjectionBatches:
    """LabelDP-Pro's alternative batches: ``size`` n₂ indices drawn uniformly without
    replacement from the N training examples at every step, from a generator seeded from
    (``seed``, epoch) at each epoch (resumes draw the same); independent of the private
    batches' Poisson coins. ``inputs(indices)`` gives the model inputs of those examples
    (their features only)."""

    def __init__(
        self, num_examples: int, size: int, inputs: Callable[[torch.Tensor], torch.Tensor],
        seed: int, device: torch.device | str = "cpu",
    ) -> None:  # fmt: skip
        if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= num_examples:
            raise ConfigError(
                f"projection_batch must be an integer in 1..{num_examples} (the training "
                f"examples), got {size!r}"
            )
        self.num_examples, self.size, self.inputs, self.seed = num_examples, size, inputs, seed
        self.device = torch.device(device)
        self._generator: torch.Generator | None = None

    def start_epoch(self, epoch: int) -> None:
        self._generator = torch.Generator(device=self.device).manual_seed(
            derive_seed(self.seed, Stream.LABELDP_PRO_PROJECTION, epoch)
        )

    def draw(self) -> torch.Tensor:
        if self._generator is None:
            self.start_epoch(0)
        order = torch.randperm(self.num_examples, generator=self._generator, device=self.device)
        return self.inputs(order[: self.size])


class LabelDPProStep(GradientStep):
    """LabelDP-Pro's step (see the module docstring): ``dpsgd``'s noisy gradient, projected
    onto the convex hull of the class gradients of a ``projection`` batch, the weights
    smoothed by ``smoothing`` λ in [0, 1] (1: no smoothing; the paper's 0.75).

    num_classes: K. projection_steps: iterations of :func:`project_onto_hull` (≥ 1).
    After a step, ``last_projection`` holds diagnostics (outside the guarantee only in
    that they are computed from the noisy gradient, which is private): the distance
    ‖Gα − g̃‖ and ‖g̃‖."""

    private_outputs: ClassVar[bool] = True

    def __init__(
        self,
        dpsgd: DPSGDStep,
        projection: ProjectionBatches,
        num_classes: int,
        smoothing: float = 0.75,
        projection_steps: int = 100,
    ) -> None:
        if not isinstance(dpsgd, DPSGDStep):
            raise ConfigError(f"dpsgd must be a DPSGDStep, got {type(dpsgd).__name__}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ConfigError(f"num_classes must be an integer ≥ 2, got {num_classes!r}")
        if not (isinstance(smoothing, (int, float)) and 0 <= smoothing <= 1):
            raise ConfigError(f"smoothing must be a number in [0, 1], got {smoothing!r}")
        if isinstance(projection_steps, bool) or not isinstance(projection_steps, int) or (
            projection_steps < 1
        ):
            raise ConfigError(f"projection_steps must be an integer ≥ 1, got {projection_steps!r}")
        self.dpsgd, self.projection, self.num_classes = dpsgd, projection, num_classes
        self.smoothing, self.projection_steps = float(smoothing), projection_steps
        self.last_projection: dict[str, float] = {}

    @property
    def steps_taken(self) -> int:
        return self.dpsgd.steps_taken

    def start_epoch(self, epoch: int) -> None:
        self.dpsgd.start_epoch(epoch)
        self.projection.start_epoch(epoch)

    def __call__(
        self,
        model: nn.Module,
        inputs: torch.Tensor,
        indices: torch.Tensor,
        targets: TargetFn,
        autocast: Callable[[], AbstractContextManager],
    ) -> StepOutput:
        out = self.dpsgd(model, inputs, indices, targets, autocast)  # p.grad = g̃
        params = [p for _, p in model.named_parameters() if p.requires_grad]
        noisy = torch.cat([p.grad.flatten().float() for p in params])
        with exact_float32():
            vertices = class_gradients(model, self.projection.draw(), self.num_classes)
            alpha = project_onto_hull(vertices, noisy, self.projection_steps)
            alpha = self.smoothing * alpha + (1 - self.smoothing) / alpha.numel()
            denoised = (alpha.to(vertices.dtype) @ vertices).to(noisy.dtype)
        self.last_projection = {
            "noisy_norm": float(torch.linalg.vector_norm(noisy)),
            "distance": float(torch.linalg.vector_norm(denoised - noisy)),
        }
        start = 0
        for p in params:
            size = p.numel()
            p.grad = denoised[start : start + size].view_as(p).to(p.dtype)
            start += size
        return out
