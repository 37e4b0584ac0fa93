"""The model zoo: small CNN, the DP-SGD tanh CNN, LabelDP-Pro's tiny CNN, ResNet-18, Wide
ResNets, an LSTM over image rows and a transformer over image patches, by name.

``build_model("wrn28-2", num_classes=10, in_channels=3, image_size=32, norm="group")``
returns a ready model. :data:`MODELS` maps each listed name to its builder; besides those,
any ``"wrn<depth>-<width>"`` name (e.g. ``"wrn28-6"``, ``"wrn16-4"``) builds a Wide ResNet.
``norm="group"`` gives a model with no BatchNorm, as DP-SGD needs.
"""

from __future__ import annotations

import re
from functools import partial
from typing import Protocol

from torch import nn

from labeldp.errors import ConfigError
from labeldp.models.cnn import SmallCNN
from labeldp.models.norm import (
    NORM_KINDS,
    check_norm_kind,
    check_positive_int,
    convert_batchnorm_to_groupnorm,
    has_batch_statistics,
    make_norm,
)
from labeldp.models.resnet import ResNet18
from labeldp.models.sequence import PatchTransformer, RowLSTM
from labeldp.models.tanh_cnn import TanhCNN
from labeldp.models.tiny_cnn import TinyCNN
from labeldp.models.wrn import WideResNet

__all__ = [
    "MODELS",
    "NORM_KINDS",
    "ModelBuilder",
    "PatchTransformer",
    "ResNet18",
    "RowLSTM",
    "SmallCNN",
    "TanhCNN",
    "TinyCNN",
    "WideResNet",
    "build_model",
    "convert_batchnorm_to_groupnorm",
    "has_batch_statistics",
    "make_norm",
    "model_builder",
    "parse_wrn_name",
]

_WRN_PATTERN = re.compile(r"wrn([0-9]+)-([0-9]+)")
_WRN_FORM = "'wrn<depth>-<width>' with positive integers, e.g. 'wrn28-2'"


class ModelBuilder(Protocol):
    """A function that builds a model from the shape of the task."""

    def __call__(
        self, *, num_classes: int, in_channels: int, image_size: int, norm: str
    ) -> nn.Module: ...


def _build_cnn(*, num_classes: int, in_channels: int, image_size: int, norm: str) -> nn.Module:
    return SmallCNN(num_classes, in_channels=in_channels, image_size=image_size, norm=norm)


def _build_tanh_cnn(*, num_classes: int, in_channels: int, image_size: int, norm: str) -> nn.Module:
    return TanhCNN(num_classes, in_channels=in_channels, image_size=image_size, norm=norm)


def _build_tiny_cnn(*, num_classes: int, in_channels: int, image_size: int, norm: str) -> nn.Module:
    return TinyCNN(num_classes, in_channels=in_channels, image_size=image_size, norm=norm)


def _build_resnet18(*, num_classes: int, in_channels: int, image_size: int, norm: str) -> nn.Module:
    return ResNet18(num_classes, in_channels=in_channels, norm=norm)


def _build_row_lstm(*, num_classes: int, in_channels: int, image_size: int, norm: str) -> nn.Module:
    return RowLSTM(num_classes, in_channels=in_channels, image_size=image_size)


def _build_patch_transformer(
    *, num_classes: int, in_channels: int, image_size: int, norm: str
) -> nn.Module:
    return PatchTransformer(num_classes, in_channels=in_channels, image_size=image_size)


def _build_wrn(
    *, depth: int, width: int, num_classes: int, in_channels: int, image_size: int, norm: str
) -> nn.Module:
    return WideResNet(num_classes, depth=depth, width=width, in_channels=in_channels, norm=norm)


def parse_wrn_name(name: str) -> tuple[int, int]:
    """``(depth, width)`` of a name like ``"wrn28-2"``; ConfigError if it is malformed."""
    match = _WRN_PATTERN.fullmatch(name)
    if match is None:
        raise ConfigError(f"model name {name!r} is not of the form {_WRN_FORM}")
    depth, width = (int(group) for group in match.groups())
    if width < 1:
        raise ConfigError(
            f"model name {name!r}: the width after '-' must be a positive integer, got {width}"
        )
    return depth, width


def _wrn_builder(name: str) -> ModelBuilder:
    depth, width = parse_wrn_name(name)
    return partial(_build_wrn, depth=depth, width=width)


MODELS: dict[str, ModelBuilder] = {
    "cnn": _build_cnn,
    "cnn-tanh": _build_tanh_cnn,
    "cnn-tiny": _build_tiny_cnn,
    "resnet18": _build_resnet18,
    "lstm-rows": _build_row_lstm,
    "vit-patches": _build_patch_transformer,
    **{f"wrn28-{k}": _wrn_builder(f"wrn28-{k}") for k in (2, 4, 8, 10)},
}


def model_builder(name: str) -> ModelBuilder:
    """The builder of the model called ``name``; ConfigError for an unknown name."""
    builder = MODELS.get(name) if isinstance(name, str) else None
    if builder is None:
        if isinstance(name, str) and name.startswith("wrn"):
            return _wrn_builder(name)
        known = ", ".join(repr(key) for key in MODELS)
        raise ConfigError(f"unknown model name {name!r}; known names: {known}, or {_WRN_FORM}")
    return builder


def build_model(
    name: str, *, num_classes: int, in_channels: int, image_size: int, norm: str = "batch"
) -> nn.Module:
    """Build the model called ``name`` for ``in_channels x image_size x image_size`` inputs.

    ``name`` is a key of :data:`MODELS` or any ``"wrn<depth>-<width>"``; ``norm`` is
    ``"batch"`` or ``"group"``. The model maps a float tensor ``(N, C, H, W)`` to logits
    ``(N, num_classes)``. Raises ConfigError for an unknown name or a bad argument.
    """
    check_positive_int("num_classes", num_classes)
    check_positive_int("in_channels", in_channels)
    check_positive_int("image_size", image_size)
    check_norm_kind(norm)
    return model_builder(name)(
        num_classes=num_classes, in_channels=in_channels, image_size=image_size, norm=norm
    )
