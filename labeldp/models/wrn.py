"""Wide ResNet WRN-depth-k (Zagoruyko & Komodakis, 2016), in the variant FixMatch uses.

Layout for ``depth = 6n + 4`` (n = 4 blocks per group for WRN-28) and widen factor k::

    conv3x3(in -> 16)
    group 1: n pre-activation blocks, 16k channels, stride 1
    group 2: n pre-activation blocks, 32k channels, stride 2
    group 3: n pre-activation blocks, 64k channels, stride 2
    norm -> leaky ReLU -> global average pool -> linear(64k -> num_classes)

A pre-activation block computes ``act(norm(x))``, conv3x3, ``act(norm(.))``, conv3x3, and
adds a shortcut: the identity, or a 1x1 conv when the width changes. As in FixMatch's
reference code, the shortcut of the very first block takes the activated input
(``activate_before_residual``) and the other shortcuts take the raw input.

Differences from the original WRN, following FixMatch: the activation is leaky ReLU with
slope 0.1 (not ReLU); dropout is 0. Convolutions have no bias and use Kaiming-normal init
with ``mode="fan_out"`` (std ``sqrt(2 / fan_out)``, FixMatch's initialiser); the linear layer
has Xavier-normal weights and a zero bias; norm layers start at weight 1, bias 0. Norm
layers keep PyTorch's default BatchNorm momentum (FixMatch uses 0.001).

Parameter counts for 3 input channels and 10 classes: WRN-28-2 1,467,610 (FixMatch's
reported count), WRN-28-4 5,849,050, WRN-28-8 23,354,842, WRN-28-10 36,479,194. Meant for
32x32 inputs; any size works thanks to the global pooling.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from labeldp.errors import ConfigError
from labeldp.models.norm import check_norm_kind, check_positive_int, make_norm

LEAKY_SLOPE = 0.1
BASE_WIDTHS = (16, 32, 64)
GROUP_STRIDES = (1, 2, 2)
STEM_CHANNELS = 16


def _act(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, negative_slope=LEAKY_SLOPE)


class PreActBlock(nn.Module):
    """A pre-activation residual block: (norm, act, conv3x3) twice, plus a shortcut."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int,
        norm: str,
        activate_before_residual: bool = False,
    ) -> None:
        super().__init__()
        self.activate_before_residual = activate_before_residual
        self.norm1 = make_norm(norm, in_channels)
        self.conv1 = nn.Conv2d(
            in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False
        )
        self.norm2 = make_norm(norm, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv2d(
                in_channels, out_channels, kernel_size=1, stride=stride, bias=False
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = _act(self.norm1(x))
        out = self.conv2(_act(self.norm2(self.conv1(pre))))
        residual = pre if self.activate_before_residual else x
        if self.shortcut is not None:
            residual = self.shortcut(residual)
        return residual + out


class WideResNet(nn.Module):
    """Wide ResNet WRN-depth-width with pre-activation blocks and leaky ReLU (slope 0.1).

    Args:
        num_classes: number of output logits.
        depth: total depth; ``(depth - 4) % 6 == 0`` (28 gives 4 blocks per group).
        width: widen factor k; the groups have 16k, 32k and 64k channels.
        in_channels: input channels (3 for CIFAR).
        norm: ``"batch"`` or ``"group"`` (see :func:`labeldp.models.norm.make_norm`).

    Parameters (3 input channels, 10 classes): WRN-28-2 1,467,610; WRN-28-10 36,479,194.
    """

    def __init__(
        self,
        num_classes: int,
        depth: int = 28,
        width: int = 2,
        in_channels: int = 3,
        norm: str = "batch",
    ) -> None:
        super().__init__()
        check_positive_int("num_classes", num_classes)
        check_positive_int("depth", depth)
        check_positive_int("width", width)
        check_positive_int("in_channels", in_channels)
        check_norm_kind(norm)
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ConfigError(
                f"depth must be 6n + 4 with n >= 1 (e.g. 10, 16, 22, 28, 40), got {depth}"
            )
        self.depth = depth
        self.width = width
        blocks_per_group = (depth - 4) // 6

        self.stem = nn.Conv2d(in_channels, STEM_CHANNELS, kernel_size=3, padding=1, bias=False)
        blocks: list[nn.Module] = []
        channels = STEM_CHANNELS
        for group, (base, stride) in enumerate(zip(BASE_WIDTHS, GROUP_STRIDES, strict=True)):
            for index in range(blocks_per_group):
                first = index == 0
                blocks.append(
                    PreActBlock(
                        channels,
                        base * width,
                        stride if first else 1,
                        norm,
                        activate_before_residual=first and group == 0,
                    )
                )
                channels = base * width
        self.blocks = nn.Sequential(*blocks)
        self.final_norm = make_norm(norm, channels)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.Linear):
                nn.init.xavier_normal_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d | nn.GroupNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_classes)`` for images ``x`` of shape ``(N, C, H, W)``."""
        out = _act(self.final_norm(self.blocks(self.stem(x))))
        return self.fc(torch.flatten(self.pool(out), 1))
