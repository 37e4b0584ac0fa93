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
   (n₂·K vectors; unclipped as in the paper, or with ``clip_vertices`` each clipped to
   norm C like the private gradients, so that they are the values a clipped gradient can
   take over the labels). No label is read, and I^P does not depend on I^G, so the
   projection is post-processing and Poisson amplification still holds.

   The two differ in what the smoothing of step 3 does. Unclipped, the uniform weights'
   point (the gradient towards uniform predictions) is C/‖∇ℓ‖ times longer, relative to
   the clipped signal, than clipped: at a trained tiny CNN (C = 1, ε = 0.5) it outweighs
   and opposes the signal, so the step keeps a cosine of only 0.1–0.3 with the clipped
   mean gradient (0.98 clipped); in training it acts as a strong pull towards
   unconfident predictions, and without it (clipped) the tiny CNN drifts to large logits
   where every example's gradient is clipped and the clipped mean shrinks to ~0.03.
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

Cost: for small models the vertices are materialised, n₂·K rows of P floats (one forward
and backward pass per class with per-example gradients by layer formulas,
:func:`class_gradients`), and each projection iteration is two products with that
matrix. Beyond :data:`MAX_MATERIALISED` coordinates, as in the paper's appendix, G's two
products are a vector-Jacobian and a Jacobian-vector product of the logits over the n₂
projection examples (:class:`ClassGradients`, its columns scaled once per step by DP-SGD's
:func:`~labeldp.train.per_example.clip_factors` of the :func:`class_gradient_norms`):
about one backward and one forward-mode pass per iteration, no memory beyond the
network's and a chunk of per-example gradients.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from typing import ClassVar

import torch
from torch import nn
from torch.func import functional_call

from ..errors import ConfigError, check_int
from ..seeding import Stream, derive_seed
from .dpsgd import DPSGDStep
from .per_example import (
    LayerwiseClipping,
    LayerwiseUnsupported,
    clip_factors,
    exact_float32,
    layerwise_supported,
    per_example_gradients,
)
from .steps import GradientStep, StepOutput
from .targets import TargetFn

#: Most vertex coordinates (n₂·K·P floats, 512 MiB in float32) materialised for the
#: projection; beyond it :class:`ClassGradients` computes G's products without G.
MAX_MATERIALISED = 2**27


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
    ``vertices`` V (m, P) and the point ``target`` g (P,) (see :func:`hull_weights`), in
    the vertices' floating-point type."""
    if vertices.dim() != 2 or target.shape != vertices.shape[1:]:
        raise ConfigError(
            f"vertices (m, P) and target (P,) disagree: {tuple(vertices.shape)}, "
            f"{tuple(target.shape)}"
        )
    V = vertices if vertices.is_floating_point() else vertices.double()
    return hull_weights(lambda a: a @ V, lambda v: V @ v, V.shape[0], target.to(V), steps)


def hull_weights(
    combine: Callable[[torch.Tensor], torch.Tensor],
    correlate: Callable[[torch.Tensor], torch.Tensor],
    m: int,
    target: torch.Tensor,
    steps: int = 100,
) -> torch.Tensor:
    """The weights α (m,) on the simplex minimising ‖Gα − g‖² for the linear map
    ``combine`` α ↦ Gα (m,) → (P,) and its transpose ``correlate`` v ↦ Gᵀv, and the point
    ``target`` g (P,): accelerated projected gradient (FISTA) for ``steps`` ≥ 1 iterations
    from the uniform weights, step 1/L with L = 2‖G‖₂² from 20 power iterations (× 1.05),
    the simplex projection of :func:`simplex_projection`. G need not be materialised."""
    check_int("steps", steps, 1)
    dtype, device = target.dtype, target.device
    x = torch.randn(m, dtype=dtype, generator=torch.Generator().manual_seed(0)).to(device)
    for _ in range(20):
        x = correlate(combine(x))
        norm = torch.linalg.vector_norm(x)
        if norm == 0:
            break
        x = x / norm
    lipschitz = 2 * float(torch.linalg.vector_norm(combine(x))) ** 2 * 1.05
    alpha = torch.full((m,), 1.0 / m, dtype=dtype, device=device)
    if lipschitz == 0:  # G = 0: any weights are optimal
        return alpha
    y, t = alpha, 1.0
    for _ in range(steps):
        gradient = 2 * correlate(combine(y) - target)
        new = simplex_projection(y - gradient / lipschitz)
        t_next = (1 + math.sqrt(1 + 4 * t * t)) / 2
        y = new + ((t - 1) / t_next) * (new - alpha)
        alpha, t = new, t_next
    return alpha


class ClassGradients:
    """The linear map of the class gradients of ``inputs`` (n examples) without
    materialising them: the columns are ∇θ ℓ(θ, (xᵢ, κ)) = Jᵢᵀ(pᵢ − e_κ) for every
    example i and class κ (Jᵢ the Jacobian of the logits, pᵢ the softmax), flattened over
    the trainable parameters; column i·K + κ. :meth:`combine` (α ↦ Gα) is one
    vector-Jacobian product of the logits with cotangents sᵢpᵢ − αᵢ (sᵢ = Σ_κ α_iκ);
    :meth:`correlate` (v ↦ Gᵀv) one Jacobian-vector product: (Gᵀv)_iκ = pᵢᵀJᵢv − (Jᵢv)_κ.
    ``scale`` (n·K,), if given, multiplies column i·K + κ (the clipping factors
    min(1, C/‖column‖)). Reads no label. float32 inside; inputs and outputs of the maps
    float64."""

    def __init__(
        self, model: nn.Module, inputs: torch.Tensor, scale: torch.Tensor | None = None
    ) -> None:
        self.params = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}
        buffers = {k: b.detach() for k, b in model.named_buffers()}
        self._logits_of = lambda params: functional_call(model, (params, buffers), (inputs,))
        self._leaves = {k: v.clone().requires_grad_(True) for k, v in self.params.items()}
        self._logits = self._logits_of(self._leaves).float()
        self.probs = torch.softmax(self._logits.detach(), dim=1)
        self.n, self.k = self.probs.shape
        self.scale = None if scale is None else scale.view(self.n, self.k).to(self.probs)

    def combine(self, alpha: torch.Tensor) -> torch.Tensor:
        a = alpha.view(self.n, self.k).to(self.probs)
        if self.scale is not None:
            a = a * self.scale
        cotangent = a.sum(1, keepdim=True) * self.probs - a
        grads = torch.autograd.grad(
            self._logits, list(self._leaves.values()), grad_outputs=cotangent,
            retain_graph=True,
        )  # fmt: skip
        return torch.cat([g.flatten() for g in grads]).to(alpha.dtype)

    def correlate(self, v: torch.Tensor) -> torch.Tensor:
        pieces = _split(v, list(self.params.values()))
        tangents = dict(zip(self.params, pieces, strict=True))
        _, jv = torch.func.jvp(self._logits_of, (self.params,), (tangents,))
        jv = jv.float()
        out = (self.probs * jv).sum(1, keepdim=True) - jv
        if self.scale is not None:
            out = out * self.scale
        return out.flatten().to(v.dtype)


def class_gradients(
    model: nn.Module, inputs: torch.Tensor, num_classes: int, chunk: int = 256,
    layerwise: bool = True,
) -> torch.Tensor:  # fmt: skip
    """The gradients ∇θ ℓ(θ, (xᵢ, κ)) of the cross-entropy for every example of
    ``inputs`` (n, ...) and every class κ < ``num_classes``, flattened over the trainable
    parameters in ``named_parameters`` order: (n·K, P) float32, row i·K + κ. Reads no
    label. One forward and backward pass per class with per-example gradients by layer
    formulas (:class:`~labeldp.train.per_example.LayerwiseClipping`) where the model
    allows and ``layerwise``, else torch.func over ``chunk`` (example, class) pairs at a
    time."""
    names = [k for k, p in model.named_parameters() if p.requires_grad]
    n = inputs.shape[0]
    if layerwise and layerwise_supported(model):
        try:
            clipping = LayerwiseClipping(model)
            per_class = []
            for k in range(num_classes):
                labels = torch.full((n,), k, dtype=torch.int64, device=inputs.device)
                clipping.forward_backward(inputs, lambda logits, y=labels: y, nullcontext)
                samples = clipping.grad_samples()
                per_class.append(torch.cat([samples[k].flatten(1).float() for k in names], 1))
            return torch.stack(per_class, dim=1).reshape(n * num_classes, -1)
        except LayerwiseUnsupported:
            pass
    rows = [
        torch.cat([grads[k].flatten(1).float() for k in names], dim=1)
        for grads in _pair_gradients(model, inputs, num_classes, chunk)
    ]
    return torch.cat(rows)


def _pair_gradients(
    model: nn.Module, inputs: torch.Tensor, num_classes: int, chunk: int
) -> Iterator[dict[str, torch.Tensor]]:
    """torch.func per-example gradients of every (example, class) pair of ``inputs`` and
    the classes < ``num_classes``, ``chunk`` pairs at a time, in row order i·K + κ."""
    pairs = inputs.repeat_interleave(num_classes, dim=0)
    classes = torch.arange(num_classes, device=inputs.device).repeat(inputs.shape[0])
    for start in range(0, pairs.shape[0], chunk):
        grads, _, _ = per_example_gradients(
            model, pairs[start : start + chunk], classes[start : start + chunk]
        )
        yield grads


def class_gradient_norms(
    model: nn.Module, inputs: torch.Tensor, num_classes: int
) -> torch.Tensor:  # fmt: skip
    """The L2 norms ‖∇θ ℓ(θ, (xᵢ, κ))‖ over the trainable parameters of the rows of
    :func:`class_gradients` ((n·K,) float32, row i·K + κ) without holding them all: torch.func
    per-example gradients of as many (example, class) pairs at a time as fit in
    :data:`MAX_MATERIALISED` coordinates. Reads no label."""
    size = sum(p.numel() for p in model.parameters() if p.requires_grad)
    chunk = max(1, min(256, MAX_MATERIALISED // max(size, 1)))
    norms = [
        torch.as_tensor(sum(g.float().flatten(1).pow(2).sum(1) for g in grads.values())).sqrt()
        for grads in _pair_gradients(model, inputs, num_classes, chunk)
    ]
    return torch.cat(norms)


def _split(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    """``flat`` (P,) cut into tensors of the shapes and dtypes of ``like`` (in order)."""
    pieces, start = [], 0
    for t in like:
        pieces.append(flat[start : start + t.numel()].view_as(t).to(t.dtype))
        start += t.numel()
    return pieces


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
    onto the convex hull of the class gradients of a ``projection`` batch (each clipped to
    ``dpsgd``'s C if ``clip_vertices``), the weights
    smoothed by ``smoothing`` λ in [0, 1] (1: no smoothing; the paper's 0.75).

    num_classes: K. projection_steps: iterations of :func:`project_onto_hull` (≥ 1).
    After a step, ``last_projection`` holds ‖g̃‖ ("noisy_norm"), the step's ‖ĝ‖
    ("projected_norm") and the distance ‖ĝ − g̃‖ (functions of the noisy gradient, the
    model and public features: covered by the guarantee); :meth:`epoch_statistics` gives
    their means over the epoch's steps, in the gradient's L2 norm (units of the loss per
    parameter), as ``projection_<name>``."""

    private_outputs: ClassVar[bool] = True

    def __init__(
        self,
        dpsgd: DPSGDStep,
        projection: ProjectionBatches,
        num_classes: int,
        smoothing: float = 0.75,
        projection_steps: int = 100,
        clip_vertices: bool = False,
    ) -> None:
        if not isinstance(dpsgd, DPSGDStep):
            raise ConfigError(f"dpsgd must be a DPSGDStep, got {type(dpsgd).__name__}")
        check_int("num_classes", num_classes, 2)
        if not (isinstance(smoothing, (int, float)) and 0 <= smoothing <= 1):
            raise ConfigError(f"smoothing must be a number in [0, 1], got {smoothing!r}")
        check_int("projection_steps", projection_steps, 1)
        self.dpsgd, self.projection, self.num_classes = dpsgd, projection, num_classes
        self.smoothing, self.projection_steps = float(smoothing), projection_steps
        self.clip_vertices = bool(clip_vertices)
        self.last_projection: dict[str, float] = {}
        self._epoch_sums: dict[str, float] = {}
        self._epoch_steps = 0

    @property
    def steps_taken(self) -> int:
        return self.dpsgd.steps_taken

    def start_epoch(self, epoch: int) -> None:
        self.dpsgd.start_epoch(epoch)
        self.projection.start_epoch(epoch)
        self._epoch_sums, self._epoch_steps = {}, 0

    def epoch_statistics(self) -> dict[str, float]:
        """The means of ``last_projection``'s numbers over the steps since the epoch began
        (a diverged step's infinities and NaNs included as they are)."""
        n = max(self._epoch_steps, 1)
        return {f"projection_{k}": v / n for k, v in self._epoch_sums.items()}

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
        inputs = self.projection.draw()  # drawn every step, so the stream stays in step
        if not bool(torch.isfinite(noisy).all()):
            # a diverged model: leave g̃ for the loop to detect (post-processing either way)
            self._record({"noisy_norm": math.inf, "projected_norm": math.nan, "distance": math.nan})
            return out
        # the layer formulas only where DP-SGD's own check kept them for this model
        layerwise = id(model) not in self.dpsgd.layerwise_fallback
        with exact_float32():
            clip = self.dpsgd.max_grad_norm if self.clip_vertices else None
            if inputs.shape[0] * self.num_classes * noisy.numel() <= MAX_MATERIALISED:
                V = class_gradients(model, inputs, self.num_classes, layerwise=layerwise)
                if clip is not None:
                    norms = torch.linalg.vector_norm(V, dim=1)
                    V = V * clip_factors(norms, clip).unsqueeze(1)
                combine, correlate, target = (lambda a: a @ V), (lambda v: V @ v), noisy
            else:  # too large to hold: G's products as Jacobian products (float64 in/out)
                scale = None
                if clip is not None:
                    norms = class_gradient_norms(model, inputs, self.num_classes)
                    scale = clip_factors(norms, clip)
                operator = ClassGradients(model, inputs, scale)
                combine, correlate, target = operator.combine, operator.correlate, noisy.double()
            columns = inputs.shape[0] * self.num_classes
            alpha = hull_weights(combine, correlate, columns, target, self.projection_steps)
            alpha = self.smoothing * alpha + (1 - self.smoothing) / columns
            denoised = combine(alpha).to(noisy.dtype)
        self._record({
            "noisy_norm": float(torch.linalg.vector_norm(noisy)),
            "projected_norm": float(torch.linalg.vector_norm(denoised)),
            "distance": float(torch.linalg.vector_norm(denoised - noisy)),
        })  # fmt: skip
        for p, piece in zip(params, _split(denoised, [p.grad for p in params]), strict=True):
            p.grad = piece
        return out

    def _record(self, numbers: dict[str, float]) -> None:
        self.last_projection = numbers
        self._epoch_steps += 1
        for k, v in numbers.items():
            self._epoch_sums[k] = self._epoch_sums.get(k, 0.0) + v
