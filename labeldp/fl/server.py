"""The server's optimizer: one update per flush, from the mean of the buffered updates.

The clients' updates Δ = x_start − x_end are pseudo-gradients; the server treats their
buffered mean u = (Σ s(τ)·Δ + noise) / K as a gradient: SGD with learning rate η_g
(``lr``) and heavy-ball momentum β (``momentum``): m ← β·m + u, x ← x − η_g·m.
FedAvg is η_g = 1, β = 0 (x ← x − mean Δ, the average of the clients' models); FedAvgM
(Hsu et al. 2019) is β > 0; FedBuff's server is the same optimizer over the buffer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import ConfigError


@dataclass(frozen=True)
class ServerOptimizer:
    """Server SGD with momentum on the flat parameter vector.

    lr: η_g, finite and > 0. momentum: β in [0, 1).
    """

    lr: float = 1.0
    momentum: float = 0.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"server_lr must be a finite number > 0, got {self.lr!r}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"server_momentum must be in [0, 1), got {self.momentum!r}")

    def step(
        self, x: torch.Tensor, update: torch.Tensor, state: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(x', state'): one step from parameters ``x`` with the mean update ``update``
        (same shape); ``state`` is the momentum buffer (None at first, and always None
        without momentum)."""
        if self.momentum == 0:
            return x - self.lr * update.to(x.dtype), None
        buf = update.clone() if state is None else self.momentum * state + update
        return x - self.lr * buf.to(x.dtype), buf
