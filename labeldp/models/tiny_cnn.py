"""The tiny CNN of LabelDP-Pro's MNIST-family experiments (Ghazi et al., ICLR 2024,
Table 10a)::

    conv 3x3 (in -> 16) -> ReLU -> avgpool 2, stride 2
    conv 3x3 (16 -> 16) -> ReLU -> avgpool 2, stride 2
    flatten (16·5·5) -> linear 16 -> ReLU -> linear num_classes

No padding (the paper states none), so 28×28 inputs give 5×5 maps: 9,066 parameters for one
input channel and 10 classes. No normalization layer: both ``norm`` kinds build the same
model (as :class:`~labeldp.models.tanh_cnn.TanhCNN`).
"""

from __future__ import annotations

import torch
from torch import nn

from labeldp.models.norm import check_small_image_model


class TinyCNN(nn.Module):
    """LabelDP-Pro's tiny CNN for 28×28 inputs (see the module docstring).

    Args:
        num_classes: number of output logits.
        in_channels: input channels (1 for Fashion-MNIST).
        image_size: side of the square input; must be 28.
        norm: accepted for a uniform interface; the model has no norm layer.
    """

    cpu_stack_forward = "grouped"

    def __init__(
        self, num_classes: int, in_channels: int = 1, image_size: int = 28, norm: str = "group"
    ) -> None:
        super().__init__()
        check_small_image_model("cnn-tiny", num_classes, in_channels, image_size, norm)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 16, kernel_size=3),
            nn.ReLU(),
            nn.AvgPool2d(2, stride=2),
            nn.Conv2d(16, 16, kernel_size=3),
            nn.ReLU(),
            nn.AvgPool2d(2, stride=2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(16 * 5 * 5, 16), nn.ReLU(), nn.Linear(16, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_classes)`` for images ``x`` of shape ``(N, C, 28, 28)``."""
        return self.classifier(self.features(x))
