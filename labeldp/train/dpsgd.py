"""DP-SGD's gradient step: per-example gradients, clipping, Gaussian noise.

Per step (Abadi et al. 2016; spec: shared/specs/label_mechanisms.md, DP-SGD): the batch
is a Poisson sample (:class:`labeldp.train.sampling.PoissonBatches`); each example's
gradient (:mod:`labeldp.train.per_example`: layer-wise from one backward pass where the
model's layers allow, else torch.func ``vmap`` over ``grad``) is clipped to L2 norm at
most C over all parameters together ("flat" clipping); the clipped gradients are summed,
Gaussian noise of standard deviation σ·C is added to every coordinate of the sum, and the
result is divided by the *expected* batch size q·N (not the realised one, which would
depend on the sample). The optimizer then steps as usual.

Memory stays bounded whatever the logical (sampled) batch: at most
``physical_batch_size`` examples are processed at a time; their clipped sum is
accumulated. An empty sample still takes a step (noise only), as the accountant assumes.

Models must not mix examples within a batch: BatchNorm is refused with a pointer to
GroupNorm (``--norm group`` or :func:`labeldp.models.convert_batchnorm_to_groupnorm`).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import ClassVar

import torch
from torch import nn

from ..errors import ConfigError
from ..mechanisms.randomness import standard_normal
from ..models.norm import has_batch_statistics
from ..seeding import Stream, derive_seed
from .per_example import (
    LayerwiseClipping,
    LayerwiseUnsupported,
    clip_factors,
    exact_float32,
    gradient_norms,
    layerwise_supported,
    per_example_gradients,
)
from .steps import GradientStep, StepOutput
from .targets import TargetFn


def check_per_example_model(model: nn.Module) -> None:
    """Refuses a model whose output for one example depends on the others (BatchNorm)."""
    if has_batch_statistics(model):
        raise ConfigError(
            "DP-SGD needs a model without batch statistics, but this model has BatchNorm "
            "layers (they mix the examples of a batch, so per-example gradients and their "
            "clipping are not per example); use --norm group, or convert the model with "
            "labeldp.models.convert_batchnorm_to_groupnorm(model)"
        )


class DPSGDStep(GradientStep):
    """The DP-SGD gradient step (a :class:`~labeldp.train.steps.GradientStep`).

    max_grad_norm: C > 0, the L2 bound on each example's gradient (flat, all parameters).
    noise_multiplier: σ ≥ 0; the noise on the summed gradient has standard deviation σ·C
        per coordinate (σ = 0 is clipping without noise, for tests; it is not private).
    expected_batch_size: q·N > 0, the divisor of the noisy sum (the sampler's expected
        batch size). physical_batch_size: at most this many per-example gradients are held
        at once (≥ 1).
    secure_noise: draw the noise from OS entropy. Otherwise it comes from a generator
        seeded from (``seed``, epoch) at the start of every epoch (the loop calls
        :meth:`start_epoch`), so resumed runs are bit-exact — and anyone who knows the
        seed can regenerate the noise: the guarantee then holds only while the seed is
        secret. Without a ``seed``, torch's global generator is used (tests).

    The loss and logits it returns are computed on the raw training data, outside the
    guarantee, so it sets ``private_outputs``: the loop neither shows nor records the
    training loss and accuracy (they would leak beyond ε if the run folder were shared).
    """

    private_outputs: ClassVar[bool] = True

    def __init__(
        self,
        max_grad_norm: float,
        noise_multiplier: float,
        expected_batch_size: float,
        physical_batch_size: int = 256,
        secure_noise: bool = False,
        seed: int | None = None,
    ) -> None:
        if not max_grad_norm > 0:
            raise ConfigError(f"max_grad_norm must be > 0, got {max_grad_norm}")
        if not noise_multiplier >= 0:
            raise ConfigError(f"noise_multiplier must be ≥ 0, got {noise_multiplier}")
        if not expected_batch_size > 0:
            raise ConfigError(f"expected_batch_size must be > 0, got {expected_batch_size}")
        if isinstance(physical_batch_size, bool) or physical_batch_size < 1:
            raise ConfigError(
                f"physical_batch_size must be an integer ≥ 1, got {physical_batch_size!r}"
            )
        self.max_grad_norm = float(max_grad_norm)
        self.noise_multiplier = float(noise_multiplier)
        self.expected_batch_size = float(expected_batch_size)
        self.physical_batch_size = int(physical_batch_size)
        self.secure_noise = bool(secure_noise)
        self.seed = seed
        self.steps_taken = 0
        self._generator: torch.Generator | None = None
        self._epoch_seed: int | None = None
        self._fallback: set[int] = set()  # models the layer-wise path could not follow
        self._verified: set[int] = set()  # models whose layer-wise norms were checked

    def start_epoch(self, epoch: int) -> None:
        """Reseeds the noise generator for ``epoch`` (called by the training loop)."""
        if self.seed is not None and not self.secure_noise:
            self._epoch_seed = derive_seed(self.seed, Stream.DPSGD_NOISE, epoch)
            self._generator = None

    def _noise_generator(self, device: torch.device) -> torch.Generator | None:
        if self._epoch_seed is None:
            return None
        if self._generator is None:
            self._generator = torch.Generator(device=device).manual_seed(self._epoch_seed)
        return self._generator

    @property
    def layerwise_fallback(self) -> frozenset[int]:
        """ids of the models whose layer-wise norms failed the check (torch.func is used)."""
        return frozenset(self._fallback)

    def _layerwise(self, model: nn.Module) -> LayerwiseClipping | None:
        if id(model) in self._fallback or not layerwise_supported(model):
            return None
        return LayerwiseClipping(model)

    def _verify(self, lc, model, x, idx, targets) -> None:
        """Once per model: the layer-wise norms must equal torch.func's on a few examples
        (catches operations that mix examples, which layer types alone cannot reveal)."""
        few, few_idx = x[:8], idx[:8]  # in float32: autocast would blur the comparison
        lc.forward_backward(few, lambda logits: targets(few_idx, logits), nullcontext)
        layerwise = lc.sq_norms().sqrt()
        lc.clipped_sums(torch.ones_like(layerwise))  # releases the stored tensors
        current = None
        if targets.uses_logits:
            with torch.no_grad():
                current = model(few).float()
        grads, _, _ = per_example_gradients(model, few, targets(few_idx, current))
        reference = gradient_norms(grads).to(layerwise.dtype)
        if not torch.allclose(layerwise, reference, rtol=1e-3, atol=1e-6):
            raise LayerwiseUnsupported("layer-wise norms differ from per-example gradients")
        self._verified.add(id(model))

    def _layerwise_chunk(self, lc, x, idx, targets, autocast):
        if id(lc.model) not in self._verified:
            self._verify(lc, lc.model, x, idx, targets)
        loss, out, t = lc.forward_backward(x, lambda logits: targets(idx, logits), autocast)
        factors = clip_factors(lc.sq_norms().sqrt(), self.max_grad_norm)
        return lc.clipped_sums(factors), loss, out, t

    def _vmap_chunk(self, model, x, idx, targets, autocast):
        current = None
        if targets.uses_logits:
            with torch.no_grad(), autocast():
                current = model(x).float()
        t = targets(idx, current)
        with autocast():
            grads, loss, out = per_example_gradients(model, x, t)
        with exact_float32():  # TF32 would blur cᵢ·gᵢ past the clipping bound
            factors = clip_factors(gradient_norms(grads), self.max_grad_norm)
            sums = {
                k: torch.tensordot(
                    factors.to(_accumulator(g.dtype)), g.to(_accumulator(g.dtype)), dims=1
                )
                for k, g in grads.items()
            }
        return sums, loss, out, t

    def __call__(
        self,
        model: nn.Module,
        inputs: torch.Tensor,
        indices: torch.Tensor,
        targets: TargetFn,
        autocast: Callable[[], AbstractContextManager],
    ) -> StepOutput:
        check_per_example_model(model)
        if type(targets).loss is not TargetFn.loss:
            raise ConfigError(
                f"DP-SGD clips per-example gradients of the cross-entropy; targets with "
                f"their own loss ({type(targets).__name__}) are not supported"
            )
        params = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
        sums = {k: torch.zeros_like(p, dtype=_accumulator(p.dtype)) for k, p in params}
        losses, logits, batch_targets = [], [], []
        layerwise = self._layerwise(model)
        for start in range(0, inputs.shape[0], self.physical_batch_size):
            x = inputs[start : start + self.physical_batch_size]
            idx = indices[start : start + self.physical_batch_size]
            chunk = None
            if layerwise is not None:
                try:
                    chunk = self._layerwise_chunk(layerwise, x, idx, targets, autocast)
                except LayerwiseUnsupported:
                    self._fallback.add(id(model))
                    layerwise = None
            if chunk is None:
                chunk = self._vmap_chunk(model, x, idx, targets, autocast)
            chunk_sums, loss, out, t = chunk
            for k, value in chunk_sums.items():
                sums[k] += value.to(sums[k].dtype)
            losses.append(loss.float())
            logits.append(out.float())
            batch_targets.append(t)
        for k, p in params:
            noise = standard_normal(
                tuple(p.shape),
                generator=self._noise_generator(p.device),
                secure=self.secure_noise,
                device=p.device,
            )
            noise = noise.to(sums[k].dtype)
            p.grad = (
                (sums[k] + self.noise_multiplier * self.max_grad_norm * noise)
                / self.expected_batch_size
            ).to(p.dtype)
        self.steps_taken += 1
        if not losses:  # an empty Poisson sample: noise only
            with torch.no_grad(), autocast():
                empty_logits = model(inputs).float()
            return StepOutput(
                torch.zeros((), device=inputs.device),
                empty_logits,
                torch.zeros(0, dtype=torch.int64, device=inputs.device),
            )
        return StepOutput(torch.cat(losses).mean(), torch.cat(logits), torch.cat(batch_targets))


def _accumulator(dtype: torch.dtype) -> torch.dtype:
    """float32 for float16/bfloat16/float32 parameters, float64 for float64 ones."""
    return torch.promote_types(dtype, torch.float32)
