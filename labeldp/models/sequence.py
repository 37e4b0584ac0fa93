"""Sequence models over images: an LSTM over the rows, a transformer encoder over patches.

They read the same ``(N, C, H, W)`` float images as the CNNs, so every dataset and method
takes them by name (``"lstm-rows"``, ``"vit-patches"``): the LSTM reads an image as H time
steps of C·W features (Fashion-MNIST: 28 steps of 28 pixels); the transformer cuts it into
non-overlapping p×p patches (Fashion-MNIST with p = 7: 16 tokens of 49 pixels).

Built by default from :mod:`labeldp.dpsgd.layers` (DPLSTM, DPMultiheadAttention: the same
functions as nn.LSTM and nn.MultiheadAttention, computed from Linear layers), so that
DP-SGD's per-example gradients come from the Linear formulas. ``fused=True`` uses
PyTorch's fused nn.LSTM / nn.MultiheadAttention instead (faster without DP-SGD;
:func:`labeldp.dpsgd.fix` turns such a model into the DP form with the same weights).
Neither has batch statistics: ``norm`` is accepted for the zoo's common signature and
ignored (the transformer normalizes with LayerNorm).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from labeldp.errors import ConfigError
from labeldp.models.norm import check_positive_int


def _check_sizes(**sizes: int) -> None:
    for name, value in sizes.items():
        check_positive_int(name, value)


def _lstm(fused: bool, input_size: int, hidden: int, layers: int) -> nn.Module:
    if fused:
        return nn.LSTM(input_size, hidden, num_layers=layers, batch_first=True)
    from labeldp.dpsgd.layers import DPLSTM  # lazy: labeldp.dpsgd imports the training core

    return DPLSTM(input_size, hidden, num_layers=layers, batch_first=True)


def _attention(fused: bool, dim: int, heads: int) -> nn.Module:
    if fused:
        return nn.MultiheadAttention(dim, heads, batch_first=True)
    from labeldp.dpsgd.layers import DPMultiheadAttention

    return DPMultiheadAttention(dim, heads, batch_first=True)


class RowLSTM(nn.Module):
    """An LSTM classifier reading an image row by row.

    (N, C, H, W) -> H steps of C·W features -> LSTM (``hidden`` units, ``layers`` layers)
    -> the last step's hidden state -> Linear -> (N, num_classes) logits.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 1,
        image_size: int = 28,
        hidden: int = 128,
        layers: int = 1,
        fused: bool = False,
    ) -> None:
        super().__init__()
        _check_sizes(
            num_classes=num_classes,
            in_channels=in_channels,
            image_size=image_size,
            hidden=hidden,
            layers=layers,
        )
        self.lstm = _lstm(fused, in_channels * image_size, hidden, layers)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        rows = x.permute(0, 2, 1, 3).reshape(n, h, c * w)
        out, _ = self.lstm(rows)
        return self.head(out[:, -1])


class EncoderBlock(nn.Module):
    """Pre-norm transformer encoder block: x + attn(LN(x)), then x + MLP(LN(x)) (GELU)."""

    def __init__(self, dim: int, heads: int, mlp: int, fused: bool) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _attention(fused, dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp)
        self.fc2 = nn.Linear(mlp, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class PatchTransformer(nn.Module):
    """A small vision transformer: p×p patches -> Linear embedding + learned position
    embedding -> ``depth`` encoder blocks -> LayerNorm, mean over tokens -> Linear.

    image_size must be a multiple of ``patch``. dim: token width (a multiple of ``heads``).
    The position embedding is an nn.Embedding over token positions (a layer with a
    per-example gradient formula), not a bare parameter.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 1,
        image_size: int = 28,
        patch: int = 7,
        dim: int = 64,
        depth: int = 2,
        heads: int = 4,
        mlp: int = 128,
        fused: bool = False,
    ) -> None:
        super().__init__()
        _check_sizes(
            num_classes=num_classes,
            in_channels=in_channels,
            image_size=image_size,
            patch=patch,
            dim=dim,
            depth=depth,
            heads=heads,
            mlp=mlp,
        )
        if image_size % patch:
            raise ConfigError(
                f"image_size ({image_size}) must be a multiple of patch ({patch}) for the "
                "patch transformer"
            )
        if dim % heads:
            raise ConfigError(f"dim ({dim}) must be a multiple of heads ({heads})")
        self.patch = patch
        self.tokens = (image_size // patch) ** 2
        self.embed = nn.Linear(in_channels * patch * patch, dim)
        self.position = nn.Embedding(self.tokens, dim)
        self.blocks = nn.Sequential(*[EncoderBlock(dim, heads, mlp, fused) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        p = self.patch
        # (N, C, H, W) -> (N, C·p·p, tokens) -> (N, tokens, C·p·p)
        patches = F.unfold(x, kernel_size=p, stride=p).transpose(1, 2)
        # a contiguous (N, tokens) index tensor (Opacus' ghost norms cannot view an expanded one)
        positions = torch.arange(self.tokens, device=x.device).repeat(n, 1)
        h = self.embed(patches) + self.position(positions)
        h = self.norm(self.blocks(h))
        return self.head(h.mean(1))
