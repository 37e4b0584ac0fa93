"""Normalisation layers for the model zoo, and the BatchNorm -> GroupNorm switch DP-SGD needs.

Every model in :mod:`labeldp.models` builds its norm layers through :func:`make_norm`, so
``norm="group"`` gives a model with no BatchNorm anywhere: each example's output then depends
on that example alone, which per-example gradient clipping (DP-SGD) requires.

GroupNorm uses ``gcd(32, channels)`` groups: 32 groups when the channel count is a multiple
of 32 (the usual choice of Wu & He, 2018), otherwise the largest count that divides the
channels, e.g. 16 channels -> 16 groups (one channel per group).

This module also holds the small argument checks the model constructors share.
"""

from __future__ import annotations

import math

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from labeldp.errors import ConfigError

NORM_KINDS: tuple[str, ...] = ("batch", "group")
MAX_GROUPS = 32


def check_positive_int(name: str, value: object) -> int:
    """Return ``value`` if it is an integer >= 1, else raise ConfigError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return value


def check_norm_kind(kind: object) -> str:
    """Return ``kind`` if it is one of :data:`NORM_KINDS`, else raise ConfigError."""
    if kind not in NORM_KINDS:
        allowed = ", ".join(repr(k) for k in NORM_KINDS)
        raise ConfigError(f"norm must be one of {allowed}, got {kind!r}")
    return kind  # type: ignore[return-value]


def check_small_image_model(
    model: str, num_classes: object, in_channels: object, image_size: object, norm: object
) -> None:
    """The shared checks of the 28×28 models without normalization layers (cnn-tanh,
    cnn-tiny): positive class and channel counts, a known ``norm`` kind (both build the
    same model), and 28×28 inputs; ConfigError naming ``model`` otherwise."""
    check_positive_int("num_classes", num_classes)
    check_positive_int("in_channels", in_channels)
    check_norm_kind(norm)
    if image_size != 28:
        raise ConfigError(f"the {model} model needs 28x28 inputs, got image_size {image_size}")


def num_groups(channels: int) -> int:
    """The GroupNorm group count used for ``channels`` channels: ``gcd(32, channels)``."""
    return math.gcd(MAX_GROUPS, channels)


def make_norm(kind: str, channels: int) -> nn.Module:
    """A 2-d norm layer over ``channels`` channels, with learnable affine parameters.

    ``kind="batch"`` gives ``nn.BatchNorm2d(channels)``; ``kind="group"`` gives
    ``nn.GroupNorm(gcd(32, channels), channels)``. Both have ``2 * channels`` parameters,
    so a model's parameter count does not depend on ``kind``.
    """
    check_norm_kind(kind)
    check_positive_int("channels", channels)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    return nn.GroupNorm(num_groups(channels), channels, affine=True)


def _group_norm_like(bn: _BatchNorm) -> nn.GroupNorm:
    """A GroupNorm with ``bn``'s channels, eps, affine parameters, device, dtype and mode."""
    gn = nn.GroupNorm(num_groups(bn.num_features), bn.num_features, eps=bn.eps, affine=bn.affine)
    reference = bn.weight if bn.affine else bn.running_mean
    if reference is not None:
        gn.to(device=reference.device, dtype=reference.dtype)
    if bn.affine:
        gn.weight.data.copy_(bn.weight.data)
        gn.bias.data.copy_(bn.bias.data)
    gn.train(bn.training)
    return gn


def convert_batchnorm_to_groupnorm(model: nn.Module) -> nn.Module:
    """Replace, in place, every BatchNorm layer of ``model`` by a GroupNorm of the same shape.

    Each ``BatchNorm{1,2,3}d`` (and ``SyncBatchNorm``) over C channels becomes
    ``GroupNorm(gcd(32, C), C)`` with the same eps; its affine weight and bias are copied
    (the running statistics are dropped: GroupNorm has none). Returns ``model``, or the new
    GroupNorm when ``model`` itself is a BatchNorm layer.

    Caveat for ``BatchNorm1d`` on ``(N, C)`` inputs: a group then holds only ``C / groups``
    numbers, and when that is 1 (C divides 32) the GroupNorm output is constant. The models
    of this package have no BatchNorm1d.
    """
    if isinstance(model, _BatchNorm):
        return _group_norm_like(model)
    for name, child in model.named_children():
        replacement = convert_batchnorm_to_groupnorm(child)
        if replacement is not child:
            setattr(model, name, replacement)
    return model


def has_batch_statistics(model: nn.Module) -> bool:
    """True if ``model`` holds any BatchNorm layer, i.e. mixes examples within a batch."""
    return any(isinstance(module, _BatchNorm) for module in model.modules())
