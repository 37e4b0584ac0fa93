"""``make_private``: DP-SGD for the user's own model, optimizer, loader and loop.

After ``model, optimizer, loader = make_private(model, optimizer, loader, ...)`` the
user's unchanged loop ``for x, y in loader: optimizer.zero_grad(); loss =
F.cross_entropy(model(x), y); loss.backward(); optimizer.step()`` is DP-SGD with Poisson
sampling: see :mod:`labeldp.dpsgd.hooks` (per-example gradients from the user's own
backward), :mod:`labeldp.dpsgd.optimizer` (clip, sum, noise, ÷ q·N, step, accounting) and
:mod:`labeldp.dpsgd.loader` (Poisson batches, empty ones included).

Privacy: (ε, δ)-DP for the relation "add or remove one example" (features and label
together), ε from dp-accounting for ``optimizer.steps`` compositions of the
Poisson-subsampled Gaussian mechanism (σ, q). The guarantee covers the model's
parameters (and anything computed from them), provided the noise stays secret: with a
``seed`` anyone who knows it can regenerate the noise, so use ``secure_noise=True`` for a
release.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from ..errors import ConfigError
from ..privacy.dpsgd_accounting import calibrate_dpsgd_noise
from .checks import (
    check_accountant,
    check_delta,
    check_loss_reduction,
    check_noise_multiplier,
    check_positive,
    check_seed,
)
from .hooks import GradSampleHooks
from .loader import PoissonDataLoader, steps_per_epoch
from .optimizer import DPOptimizer
from .validation import check as check_model


def _seeds(seed: int | None) -> tuple[int | None, int | None]:
    """(noise seed, sampling seed): two independent 63-bit seeds from ``seed``."""
    if seed is None:
        return None, None
    import numpy as np

    words = np.random.SeedSequence([seed, 0x64707367]).generate_state(2, np.uint64)
    return int(words[0] >> 1), int(words[1] >> 1)


def make_private(
    model: nn.Module,
    optimizer: Optimizer,
    loader: DataLoader,
    *,
    max_grad_norm: float,
    noise_multiplier: float | None = None,
    target_epsilon: float | None = None,
    delta: float,
    epochs: int | None = None,
    accountant: str = "pld",
    poisson_sampling: bool = True,
    secure_noise: bool = False,
    seed: int | None = None,
    loss_reduction: str = "mean",
    max_epsilon: float | None = None,
) -> tuple[nn.Module, DPOptimizer, DataLoader]:
    """Makes ``model``'s training by ``optimizer`` on ``loader`` DP-SGD.

    max_grad_norm: C > 0, the L2 bound on each example's gradient over all parameters.
    noise_multiplier: σ ≥ 0 (noise std σ·C per coordinate of the summed gradient, per
        step), or target_epsilon: ε > 0 to reach after ``epochs`` epochs (σ calibrated by
        labeldp.privacy.dpsgd_accounting.calibrate_dpsgd_noise); exactly one of the two.
    delta: δ in (0, 1). epochs: ≥ 1 (needed with target_epsilon; an epoch is ceil(1/q)
        steps). accountant: "pld" (default) or "rdp".
    poisson_sampling: True (default): the returned loader samples each example with rate
        q = loader.batch_size / N per step. False keeps ``loader`` as it is; ε is then
        still the Poisson-sampling ε (as in Opacus), which shuffled fixed-size batches do
        not strictly satisfy — a warning says so.
    secure_noise: noise and sampling from OS entropy. seed: integer seeding the noise
        and the sampling (None: fresh randomness). loss_reduction: "mean" (default) or
        "sum", how the loss of the user's loop combines the batch. max_epsilon: None, or
        ε > 0 that ``optimizer.step()`` refuses to exceed (BudgetExhausted).

    Returns (model, optimizer, loader): the same model object, now with hooks; a
    :class:`DPOptimizer` wrapping ``optimizer``; a :class:`PoissonDataLoader`.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(optimizer, Optimizer):
        raise ConfigError(
            f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
        )
    if isinstance(optimizer, DPOptimizer):
        raise ConfigError("optimizer is already private (make_private was applied to it)")
    max_grad_norm = check_positive("max_grad_norm", max_grad_norm)
    delta = check_delta(delta)
    accountant = check_accountant(accountant)
    loss_reduction = check_loss_reduction(loss_reduction)
    seed = check_seed(seed, bool(secure_noise))
    if (noise_multiplier is None) == (target_epsilon is None):
        raise ConfigError(
            "give exactly one of noise_multiplier (σ ≥ 0) and target_epsilon (ε > 0, with "
            f"epochs), got noise_multiplier={noise_multiplier!r}, "
            f"target_epsilon={target_epsilon!r}"
        )
    if epochs is not None and (
        isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1
    ):
        raise ConfigError(f"epochs must be an integer ≥ 1, got {epochs!r}")
    if target_epsilon is not None:
        target_epsilon = check_positive("target_epsilon", target_epsilon)
        if epochs is None:
            raise ConfigError(
                "target_epsilon needs epochs (an integer ≥ 1): the noise is calibrated for "
                "that many epochs of ceil(1/q) steps"
            )
    if max_epsilon is not None:
        max_epsilon = check_positive("max_epsilon", max_epsilon)
    check_model(model)
    noise_seed, sample_seed = _seeds(seed)

    if poisson_sampling:
        generator = torch.Generator()
        if sample_seed is None:
            generator.seed()
        else:
            generator.manual_seed(sample_seed)
        private_loader: DataLoader = PoissonDataLoader.from_loader(
            loader, generator=generator, secure=bool(secure_noise)
        )
        sample_rate = private_loader.sample_rate  # type: ignore[attr-defined]
    else:
        PoissonDataLoader.from_loader(loader)  # the same checks of the loader
        warnings.warn(
            "poisson_sampling=False: ε is accounted as for Poisson sampling, which shuffled "
            "batches of fixed size do not strictly satisfy",
            stacklevel=2,
        )
        private_loader = loader
        sample_rate = loader.batch_size / len(loader.dataset)  # type: ignore[operator,arg-type]
    expected_batch_size = sample_rate * len(loader.dataset)  # type: ignore[arg-type]

    if target_epsilon is not None:
        steps = epochs * steps_per_epoch(sample_rate)  # type: ignore[operator]
        sigma = calibrate_dpsgd_noise(target_epsilon, delta, sample_rate, steps, accountant)
    else:
        sigma = check_noise_multiplier(noise_multiplier)
        if sigma == 0:
            warnings.warn(
                "noise_multiplier=0: clipping without noise is not private (ε = ∞)", stacklevel=2
            )

    model_params = {id(p) for p in model.parameters() if p.requires_grad}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.requires_grad and id(p) not in model_params:
                raise ConfigError(
                    "optimizer holds a trainable parameter that is not one of model's (build "
                    "the optimizer from model.parameters(), after labeldp.dpsgd.fix(model))"
                )
    hooks = GradSampleHooks(model, loss_reduction)
    private_optimizer = DPOptimizer(
        optimizer,
        hooks,
        max_grad_norm=max_grad_norm,
        noise_multiplier=sigma,
        sample_rate=sample_rate,
        expected_batch_size=expected_batch_size,
        delta=delta,
        max_epsilon=max_epsilon,
        accountant=accountant,
        secure_noise=bool(secure_noise),
        seed=noise_seed,
    )
    assert math.isfinite(private_optimizer.expected_batch_size)
    return model, private_optimizer, private_loader
