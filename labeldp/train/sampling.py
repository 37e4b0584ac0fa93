"""Batch samplers: which example indices make up each step of an epoch."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import torch


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
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
        self.batch_size = batch_size

    def steps_per_epoch(self, num_examples: int) -> int:
        return -(-num_examples // self.batch_size)

    def batches(self, num_examples: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
        order = torch.randperm(num_examples, generator=generator, device=generator.device)
        yield from torch.tensor_split(order, self.steps_per_epoch(num_examples))
