"""Virtual batches: a large logical (Poisson) batch processed in bounded physical chunks.

``with virtual_batches(loader, optimizer, max_physical_batch_size=64) as chunks:`` gives
an iterable of physical batches of at most ``max_physical_batch_size`` examples: each
logical batch of ``loader`` cut along dim 0. Before yielding a chunk that is not the last
of its logical batch it calls ``optimizer.signal_skip_step()``, so the user's unchanged
``zero_grad / backward / step`` clips that chunk's examples and adds their sum to the
logical batch's, without noise and without stepping; the last chunk's ``step()`` adds the
noise once, divides by q·N and steps. One logical batch = one noisy step = one accounted
step, whatever the chunking (the same idea as Opacus' BatchMemoryManager). Memory holds
the activations of one chunk at a time. An empty logical batch is one empty chunk.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch

from ..errors import ConfigError, check_int
from .optimizer import DPOptimizer


def _batch_size(batch: object) -> int:
    """Rows of the first tensor found in ``batch``."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    values = batch.values() if isinstance(batch, dict) else batch
    if isinstance(values, (tuple, list)) or isinstance(batch, dict):
        for v in values:
            try:
                return _batch_size(v)
            except ConfigError:
                continue
    raise ConfigError(f"a batch must hold at least one tensor, got {type(batch).__name__}")


def _rows(batch: object, start: int, stop: int) -> object:
    if isinstance(batch, torch.Tensor):
        return batch[start:stop]
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(_rows(b, start, stop) for b in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(_rows(b, start, stop) for b in batch)
    if isinstance(batch, dict):
        return {k: _rows(v, start, stop) for k, v in batch.items()}
    return batch


class _Chunks:
    def __init__(self, loader: Iterable, optimizer: DPOptimizer, size: int) -> None:
        self.loader, self.optimizer, self.size = loader, optimizer, size

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]  # logical batches (a lower bound)

    def __iter__(self) -> Iterator[object]:
        for batch in self.loader:
            n = _batch_size(batch)
            starts = list(range(0, n, self.size)) or [0]
            for i, start in enumerate(starts):
                self.optimizer.signal_skip_step(i < len(starts) - 1)
                yield _rows(batch, start, start + self.size)


@contextlib.contextmanager
def virtual_batches(
    loader: Iterable, optimizer: DPOptimizer, max_physical_batch_size: int
) -> Iterator[Iterable]:
    """Physical chunks of ``loader``'s logical batches (see the module docstring).

    loader: the loader make_private returned. optimizer: its DPOptimizer.
    max_physical_batch_size: ≥ 1 examples per chunk."""
    check_int("max_physical_batch_size", max_physical_batch_size, 1)
    if not isinstance(optimizer, DPOptimizer):
        raise ConfigError(
            f"optimizer must be the DPOptimizer make_private returned, got "
            f"{type(optimizer).__name__}"
        )
    try:
        yield _Chunks(loader, optimizer, max_physical_batch_size)
    finally:
        optimizer.signal_skip_step(False)
