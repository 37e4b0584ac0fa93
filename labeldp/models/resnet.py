"""ResNet-18, CIFAR variant (He et al., 2016, as commonly adapted to 32x32 inputs).

The stem is a single 3x3 stride-1 convolution to 64 channels with no max-pool; then four
stages of two BasicBlocks with 64, 128, 256 and 512 channels and strides 1, 2, 2, 2; then
global average pooling and a linear layer. Meant for 32x32 inputs; thanks to the global
pooling any size works, 28x28 included (both end in a 4x4 map). With 3 input channels and
10 classes it has 11,173,962 parameters (the well-known CIFAR ResNet-18 count). Weights use
PyTorch's default initialisation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from labeldp.models.norm import check_norm_kind, check_positive_int, make_norm

STAGE_WIDTHS = (64, 128, 256, 512)
STAGE_STRIDES = (1, 2, 2, 2)
BLOCKS_PER_STAGE = 2


class BasicBlock(nn.Module):
    """Two 3x3 conv+norm layers with a residual connection; ReLU after the addition.

    The shortcut is the identity, or a 1x1 conv + norm when the stride or width changes.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, norm: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(
            in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False
        )
        self.norm1 = make_norm(norm, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.norm2 = make_norm(norm, out_channels)
        if stride != 1 or in_channels != out_channels:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
                make_norm(norm, out_channels),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for small images (CIFAR-10/100 at 32x32, or 28x28 inputs).

    Args:
        num_classes: number of output logits.
        in_channels: input channels (3 for CIFAR).
        norm: ``"batch"`` or ``"group"`` (see :func:`labeldp.models.norm.make_norm`).

    Parameters: 11,173,962 for 3 input channels and 10 classes.
    """

    def __init__(self, num_classes: int, in_channels: int = 3, norm: str = "batch") -> None:
        super().__init__()
        check_positive_int("num_classes", num_classes)
        check_positive_int("in_channels", in_channels)
        check_norm_kind(norm)
        first = STAGE_WIDTHS[0]
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, first, kernel_size=3, padding=1, bias=False),
            make_norm(norm, first),
            nn.ReLU(),
        )
        blocks: list[nn.Module] = []
        channels = first
        for width, stride in zip(STAGE_WIDTHS, STAGE_STRIDES, strict=True):
            for index in range(BLOCKS_PER_STAGE):
                blocks.append(BasicBlock(channels, width, stride if index == 0 else 1, norm))
                channels = width
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_classes)`` for images ``x`` of shape ``(N, C, H, W)``."""
        out = self.blocks(self.stem(x))
        return self.fc(torch.flatten(self.pool(out), 1))
