"""Batch samplers: which example indices make up each step of an epoch."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import torch

from ..errors import ConfigError


class BatchSampler(Protocol):
    def steps_per_epoch(self, num_examples: int) -> int:
        """Number of optimizer steps in one epoch (expected number, if random)."""
        ...

    def batches(self, num_examples: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
        """Index tensors (int64, on the generator's device), one per step."""
        ...


class ShuffledBatches:
    """Every example once per epoch, in a random order, in ceil(N / batch_size) batches of
    near-equal size (sizes differ by at most one, so no batch is left with a single
    example, which batch normalization cannot train on)."""

    def __init__(self, batch_size: int) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be ≥ 1, got {batch_size}")
        self.batch_size = batch_size

    def steps_per_epoch(self, num_examples: int) -> int:
        return -(-num_examples // self.batch_size)

    def batches(self, num_examples: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
        order = torch.randperm(num_examples, generator=generator, device=generator.device)
        yield from torch.tensor_split(order, self.steps_per_epoch(num_examples))


def poisson_sample(
    num_examples: int, sample_rate: float, generator: torch.Generator, secure: bool = False
) -> torch.Tensor:
    """One Poisson sample: the indices (int64, on the generator's device, ascending) of the
    examples among ``num_examples`` whose coin, uniform in [0, 1) (float64, from
    ``generator``, or OS entropy with ``secure``), falls below ``sample_rate`` q. The one
    draw of DP-SGD's batches: :class:`PoissonBatches` (labeldp's trainer) and
    :class:`labeldp.dpsgd.loader.PoissonBatchSampler` (a user's DataLoader) both use it."""
    from ..mechanisms.randomness import uniform

    if secure:
        coins = uniform((num_examples,), secure=True, device=generator.device)
    else:
        coins = torch.rand(
            num_examples, generator=generator, dtype=torch.float64, device=generator.device
        )
    return torch.nonzero(coins < sample_rate).flatten()


class PoissonBatches:
    """Poisson sampling, as DP-SGD's accounting assumes: in every step each example joins
    the batch independently with probability q = expected_batch_size / N, so batch sizes
    vary (Binomial(N, q)) and may be 0. An "epoch" is ceil(N / expected_batch_size) steps.

    expected_batch_size: q·N, ≥ 1 and ≤ N (checked when N is known).
    secure: draw the membership coins from OS entropy instead of the epoch's generator.
    """

    def __init__(self, expected_batch_size: int, secure: bool = False) -> None:
        if isinstance(expected_batch_size, bool) or expected_batch_size < 1:
            raise ConfigError(f"expected_batch_size must be ≥ 1, got {expected_batch_size}")
        self.expected_batch_size = expected_batch_size
        self.secure = secure

    def sample_rate(self, num_examples: int) -> float:
        """q = expected_batch_size / N, in (0, 1]."""
        if num_examples < self.expected_batch_size:
            raise ValueError(
                f"expected_batch_size ({self.expected_batch_size}) must be at most the number "
                f"of training examples ({num_examples})"
            )
        return self.expected_batch_size / num_examples

    def steps_per_epoch(self, num_examples: int) -> int:
        return -(-num_examples // self.expected_batch_size)

    def batches(self, num_examples: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
        q = self.sample_rate(num_examples)
        for _ in range(self.steps_per_epoch(num_examples)):
            yield poisson_sample(num_examples, q, generator, self.secure)
