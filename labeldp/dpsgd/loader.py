"""Poisson sampling for a user's Dataset: the batches DP-SGD's accounting assumes.

:class:`PoissonDataLoader` is a ``torch.utils.data.DataLoader`` over the user's map-style
dataset whose batch sampler (:class:`PoissonBatchSampler`) includes every example
independently with probability q = expected_batch_size / N in every step, so a batch has
Binomial(N, q) examples (possibly none). One epoch is ``ceil(1/q)`` steps (= ceil(N / B)
for the expected batch size B = q·N): in expectation each example is seen about once, and
the epoch is the one of labeldp's own trainer (:class:`labeldp.train.sampling.
PoissonBatches`), so ``epochs`` means the same number of steps on both paths.

Empty batches (as Opacus does): the user's ``collate_fn`` is applied to the first example
of the dataset once, and an empty draw is returned as that batch with every tensor cut to
0 rows — same structure, dtypes and per-example shapes — so the user's loop runs and the
optimizer takes its noise-only step. Its loss under ``reduction="mean"`` is NaN (0/0), but
its gradient is empty, so nothing NaN reaches the update.

Randomness: the membership coins come from the loader's own generator (seeded, so a run
repeats exactly; its state is in :meth:`PoissonDataLoader.state_dict`), or from OS entropy
with ``secure=True``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset
from torch.utils.data.dataloader import default_collate

from ..errors import ConfigError
from ..train.sampling import poisson_sample


def steps_per_epoch(sample_rate: float) -> int:
    """ceil(1/q), at least 1: the steps of one epoch at sample rate q in (0, 1] (ceil(N/B)
    for q = B/N, as :meth:`labeldp.train.sampling.PoissonBatches.steps_per_epoch`; the
    1e-9 keeps 1/q = 10.000000000000002 from rounding up to 11)."""
    return max(1, math.ceil(1 / sample_rate - 1e-9))


class PoissonBatchSampler:
    """Index lists, one per step: example i is in a step's batch with probability q,
    independently of the other examples and steps.

    num_examples: N ≥ 1. sample_rate: q in (0, 1]. steps: batches per pass (an "epoch").
    generator: a CPU ``torch.Generator`` (ignored with ``secure=True``).
    """

    def __init__(
        self,
        num_examples: int,
        sample_rate: float,
        steps: int,
        generator: torch.Generator | None = None,
        secure: bool = False,
    ) -> None:
        if num_examples < 1:
            raise ConfigError(f"the dataset must hold at least one example, got {num_examples}")
        if not 0 < sample_rate <= 1:
            raise ConfigError(f"sample_rate must be in (0, 1], got {sample_rate}")
        self.num_examples = num_examples
        self.sample_rate = sample_rate
        self.steps = steps
        self.secure = secure
        self.generator = generator if generator is not None else torch.Generator()

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            yield poisson_sample(
                self.num_examples, self.sample_rate, self.generator, self.secure
            ).tolist()


def _cut_to_empty(batch: object) -> object:
    """``batch`` with every tensor cut to 0 rows (tuples, lists and dicts followed)."""
    if isinstance(batch, torch.Tensor):
        return batch[:0]
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a named tuple
        return type(batch)(*(_cut_to_empty(b) for b in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(_cut_to_empty(b) for b in batch)
    if isinstance(batch, dict):
        return {k: _cut_to_empty(v) for k, v in batch.items()}
    raise ConfigError(
        f"cannot build an empty batch holding a {type(batch).__name__}: the collated batch "
        "must be made of tensors (in tuples, lists or dicts)"
    )


class _EmptySafeCollate:
    """The user's collate_fn, with an empty draw turned into an empty batch of the right
    structure (see the module docstring)."""

    def __init__(self, collate_fn: Callable, dataset: Dataset) -> None:
        self.collate_fn = collate_fn
        self.dataset = dataset
        self._empty: object | None = None

    def __call__(self, samples: list) -> object:
        if samples:
            return self.collate_fn(samples)
        if self._empty is None:
            self._empty = _cut_to_empty(self.collate_fn([self.dataset[0]]))
        return self._empty


class PoissonDataLoader(DataLoader):
    """A DataLoader of Poisson-sampled batches from ``dataset`` (see the module docstring).

    sample_rate: q in (0, 1] (expected batch size q·N). generator: CPU generator of the
    coins; secure: coins from OS entropy instead. Other keywords go to DataLoader
    (collate_fn, num_workers, pin_memory, ...).
    """

    def __init__(
        self,
        dataset: Dataset,
        sample_rate: float,
        *,
        collate_fn: Callable | None = None,
        generator: torch.Generator | None = None,
        secure: bool = False,
        **kwargs: object,
    ) -> None:
        if isinstance(dataset, IterableDataset):
            raise ConfigError(
                "loader.dataset must be a map-style Dataset (with __len__ and __getitem__); "
                "Poisson sampling cannot draw from an IterableDataset"
            )
        n = len(dataset)  # type: ignore[arg-type]
        self.sample_rate = float(sample_rate)
        self.expected_batch_size = self.sample_rate * n
        sampler = PoissonBatchSampler(
            n, self.sample_rate, steps_per_epoch(self.sample_rate), generator, secure
        )
        super().__init__(
            dataset,
            batch_sampler=sampler,
            collate_fn=_EmptySafeCollate(collate_fn or default_collate, dataset),
            **kwargs,  # type: ignore[arg-type]
        )

    @property
    def poisson_sampler(self) -> PoissonBatchSampler:
        return self.batch_sampler  # type: ignore[return-value]

    def state_dict(self) -> dict:
        """The coins' generator state (resume a run with the same batches)."""
        return {"generator": self.poisson_sampler.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.poisson_sampler.generator.set_state(state["generator"])

    @classmethod
    def from_loader(
        cls,
        loader: DataLoader,
        *,
        generator: torch.Generator | None = None,
        secure: bool = False,
    ) -> PoissonDataLoader:
        """The Poisson version of ``loader``: q = loader.batch_size / len(loader.dataset),
        the same dataset, collate_fn, workers and memory pinning."""
        if not isinstance(loader, DataLoader):
            raise ConfigError(
                f"loader must be a torch.utils.data.DataLoader, got {type(loader).__name__}"
            )
        if loader.batch_size is None:
            raise ConfigError(
                "loader.batch_size must be an integer ≥ 1 (the expected batch size q·N), got "
                "None (a loader built with batch_sampler=...); build it with batch_size="
            )
        if isinstance(loader.dataset, IterableDataset):
            raise ConfigError(
                "loader.dataset must be a map-style Dataset (with __len__ and __getitem__); "
                "Poisson sampling cannot draw from an IterableDataset"
            )
        n = len(loader.dataset)  # type: ignore[arg-type]
        if not 1 <= loader.batch_size <= n:
            raise ConfigError(
                f"loader.batch_size must be in [1, N = {n}] (the dataset's size), got "
                f"{loader.batch_size}"
            )
        kwargs: dict[str, object] = {
            "num_workers": loader.num_workers,
            "pin_memory": loader.pin_memory,
            "timeout": loader.timeout,
            "worker_init_fn": loader.worker_init_fn,
        }
        if loader.num_workers > 0:
            kwargs["multiprocessing_context"] = loader.multiprocessing_context
            kwargs["persistent_workers"] = loader.persistent_workers
            if loader.prefetch_factor is not None:
                kwargs["prefetch_factor"] = loader.prefetch_factor
        return cls(
            loader.dataset,
            loader.batch_size / n,
            collate_fn=loader.collate_fn,
            generator=generator,
            secure=secure,
            **kwargs,
        )
