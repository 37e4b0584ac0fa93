"""The small tanh CNN that DP-SGD papers use on 28×28 images.

Architecture of Papernot et al. (2021, "Tempered sigmoid activations for deep learning
with differential privacy") and of the end-to-end baseline of Tramèr & Boneh (2021), which
reaches about 86 % on Fashion-MNIST at ε = 3 with DP-SGD::

    conv 8x8, stride 2, padding 2 (in -> 16)  -> tanh -> maxpool 2, stride 1
    conv 4x4, stride 2 (16 -> 32)             -> tanh -> maxpool 2, stride 1
    flatten (32·4·4) -> linear 32 -> tanh -> linear num_classes

26,010 parameters for one input channel and 10 classes. It has no normalization layer, so
it takes ``norm`` only to refuse BatchNorm-free requests consistently: both kinds build
the same model. DP-SGD favours such small, bounded-activation models: the noise added per
step grows with the parameter count, and tanh keeps activations (and gradients) bounded.
"""

from __future__ import annotations

import torch
from torch import nn

from labeldp.models.norm import check_small_image_model


class TanhCNN(nn.Module):
    """The DP-SGD CNN for 28×28 inputs (see the module docstring).

    Args:
        num_classes: number of output logits.
        in_channels: input channels (1 for Fashion-MNIST).
        image_size: side of the square input; must be 28.
        norm: accepted for a uniform interface; the model has no norm layer.
    """

    #: How a stack of these models runs its forward pass on CPU when asked for "auto"
    #: (:class:`labeldp.train.ensemble.StackedModels`): as one grouped model.
    cpu_stack_forward = "grouped"

    def __init__(
        self, num_classes: int, in_channels: int = 1, image_size: int = 28, norm: str = "group"
    ) -> None:
        super().__init__()
        check_small_image_model("cnn-tanh", num_classes, in_channels, image_size, norm)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 16, kernel_size=8, stride=2, padding=2),
            nn.Tanh(),
            nn.MaxPool2d(kernel_size=2, stride=1),
            nn.Conv2d(16, 32, kernel_size=4, stride=2),
            nn.Tanh(),
            nn.MaxPool2d(kernel_size=2, stride=1),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(32 * 4 * 4, 32), nn.Tanh(), nn.Linear(32, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_classes)`` for images ``x`` of shape ``(N, C, 28, 28)``."""
        return self.classifier(self.features(x))
