"""Whole datasets held as tensors on one device, and label-independent index utilities.

A :class:`DeviceDataset` keeps every image as uint8 (0..255) and every label as int64 on
the device that trains on it, so batches are gathered by indexing instead of a DataLoader.
Normalisation (``info.mean``/``info.std``) and augmentation are left to the training code.

:func:`random_subset` and :func:`random_partition` only ever see a count, never labels, so
the subsets they draw cannot depend on the (private) labels.
"""

from __future__ import annotations

import math
import operator
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from labeldp.data.formats import read_cifar_batch, read_idx
from labeldp.data.sources import DatasetInfo, find_file, get_info, locate
from labeldp.errors import ConfigError, DataError
from labeldp.seeding import Stream, derive_seed


class DeviceDataset:
    """Images (uint8, shape (N, C, H, W), values 0..255) and labels (int64, shape (N,),
    values 0..num_classes-1) of one dataset split, on one device.

    Raises ``ConfigError`` for tensors of the wrong type, dtype or shape for ``info``, and
    ``DataError`` when the contents cannot be right (no examples, different numbers of
    images and labels, labels out of range).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, info: DatasetInfo) -> None:
        if not isinstance(images, torch.Tensor) or not isinstance(labels, torch.Tensor):
            raise ConfigError(
                f"DeviceDataset needs torch tensors, got images of type "
                f"{type(images).__name__} and labels of type "
                f"{type(labels).__name__}"
            )
        shape = (info.channels, info.image_size, info.image_size)
        if images.dtype != torch.uint8 or images.dim() != 4 or tuple(images.shape[1:]) != shape:
            raise ConfigError(
                f"{info.name} images must be torch.uint8 of shape (N, "
                f"{', '.join(map(str, shape))}), got {images.dtype} of shape "
                f"{tuple(images.shape)}"
            )
        if labels.dtype != torch.int64 or labels.dim() != 1:
            raise ConfigError(
                f"{info.name} labels must be torch.int64 of shape (N,), got "
                f"{labels.dtype} of shape {tuple(labels.shape)}"
            )
        if images.device != labels.device:
            raise ConfigError(
                f"images are on {images.device} but labels on {labels.device}; "
                "they must be on one device"
            )
        if len(images) != len(labels):
            raise DataError(f"{info.name}: {len(images)} images but {len(labels)} labels")
        if len(labels) == 0:
            raise DataError(f"{info.name}: the dataset has no examples")
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= info.num_classes:
            raise DataError(
                f"{info.name} labels must lie in 0..{info.num_classes - 1}, found "
                f"values from {low} to {high}"
            )
        self.images = images
        self.labels = labels
        self.info = info

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        return (
            f"DeviceDataset({self.info.name}, n={len(self)}, "
            f"images={tuple(self.images.shape)}, device={self.device})"
        )

    @property
    def device(self) -> torch.device:
        """The device holding the images and labels."""
        return self.images.device

    def to(self, device: str | torch.device) -> DeviceDataset:
        """This dataset on ``device`` (the same tensors if it is already there)."""
        return DeviceDataset(self.images.to(device), self.labels.to(device), self.info)

    def subset(self, indices: torch.Tensor) -> DeviceDataset:
        """The examples at ``indices`` (a 1-D integer tensor of values in 0..N-1, in the
        given order; repeats allowed) as a new dataset on the same device."""
        if (
            not isinstance(indices, torch.Tensor)
            or indices.dim() != 1
            or indices.dtype.is_floating_point
            or indices.dtype.is_complex
            or indices.dtype == torch.bool
        ):
            raise ConfigError(
                "subset indices must be a 1-D integer tensor (torch.long), got "
                f"{getattr(indices, 'dtype', type(indices).__name__)} of shape "
                f"{tuple(getattr(indices, 'shape', ()))}"
            )
        if len(indices) == 0:
            raise ConfigError("subset indices are empty; a subset needs at least one example")
        indices = indices.to(device=self.device, dtype=torch.long)
        low, high = int(indices.min()), int(indices.max())
        if low < 0 or high >= len(self):
            raise ConfigError(
                f"subset indices must lie in 0..{len(self) - 1}, found values from {low} to {high}"
            )
        return DeviceDataset(self.images[indices], self.labels[indices], self.info)


def _load_split(
    info: DatasetInfo, folder: Path, files: tuple[str, ...], fix: str
) -> tuple[np.ndarray, np.ndarray]:
    paths = []
    for name in files:
        path = find_file(info, folder, name)
        if path is None:  # removed since locate() saw it
            raise DataError(f"{folder / name} has disappeared; {fix}")
        paths.append(path)
    if info.format == "idx":
        images, labels = read_idx(paths[0], ndim=3, fix=fix), read_idx(paths[1], ndim=1, fix=fix)
        if len(images) != len(labels):
            raise DataError(
                f"{paths[0]} holds {len(images)} images but {paths[1]} holds "
                f"{len(labels)} labels; {fix}"
            )
        size = (info.image_size, info.image_size)
        if images.shape[1:] != size:
            raise DataError(
                f"{paths[0]} holds images of size {images.shape[1:]}, expected "
                f"{size} for {info.name}; {fix}"
            )
        return images[:, None], labels.astype(np.int64)
    if info.format == "cifar":
        batches = [read_cifar_batch(p, info.label_key, fix=fix) for p in paths]
        if len(batches) == 1:
            return batches[0]
        return (np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches]))
    raise ConfigError(f"{info.name}: unknown dataset format {info.format!r}")


def load_splits(
    name: str | DatasetInfo,
    *,
    data_dir: str | os.PathLike | None = None,
    download: bool = True,
    device: str | torch.device = "cpu",
) -> tuple[DeviceDataset, DeviceDataset]:
    """Load the (train, test) splits of a dataset onto ``device``.

    The files are found (and with ``download=True`` fetched) by
    :func:`labeldp.data.sources.locate`; each file is read once. Raises ``ConfigError`` for
    an unknown name, ``DataError`` for missing or corrupt files.
    """
    info = get_info(name)
    folder = locate(info, data_dir, download=download)
    fix = f"delete it and fetch the dataset again (labeldp data fetch {info.name})"
    splits = []
    for files in (info.train_files, info.test_files):
        images, labels = _load_split(info, folder, files, fix)
        split = DeviceDataset(torch.from_numpy(images), torch.from_numpy(labels), info)
        splits.append(split.to(device))
    return splits[0], splits[1]


def _count(value: object, what: str) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"{what} must be an integer, got {value!r}")
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise ConfigError(f"{what} must be an integer, got {value!r}") from None


def _permutation(n: int, seed: int) -> torch.Tensor:
    seed = _count(seed, "seed")
    if not 0 <= seed < 2**64:
        raise ConfigError(f"seed must be an integer in 0..2**64-1, got {seed}")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randperm(n, generator=generator)


def random_subset(n: int, size: int, seed: int) -> torch.Tensor:
    """``size`` distinct indices drawn uniformly from 0..n-1, sorted, as a CPU LongTensor.

    The draw depends only on ``(n, size, seed)`` (a seeded CPU ``torch.Generator``), so it
    is identical across machines and cannot depend on labels. ``size`` must be 1..n;
    otherwise ``ConfigError`` names ``size`` (``--train-size``) and the allowed range.
    """
    n = _count(n, "n (the number of examples)")
    size = _count(size, "size (--train-size)")
    if n < 1:
        raise ConfigError(f"cannot draw a subset of an empty dataset (n={n})")
    if not 1 <= size <= n:
        raise ConfigError(
            f"size (--train-size) must be between 1 and {n} (the number of examples), got {size}"
        )
    return _permutation(n, seed)[:size].sort().values


#: The seed of every validation split, the same for all runs and seeds so that tuning runs
#: of one dataset share their validation examples.
VALIDATION_SEED = 0


def hold_out(train: DeviceDataset, size: int, dataset: str) -> tuple[DeviceDataset, DeviceDataset]:
    """(the rest, the validation split): ``size`` examples carved from ``train``, drawn
    uniformly without looking at labels (:func:`random_subset` with a fixed seed).
    ConfigError unless 1 ≤ size ≤ len(train) − 1 (``validation_size``, named with
    ``dataset``)."""
    if not isinstance(size, int) or isinstance(size, bool) or not 1 <= size <= len(train) - 1:
        raise ConfigError(
            f"validation_size must be in 1..{len(train) - 1} for {dataset} (the "
            f"training split less one example), got {size!r}"
        )
    held = random_subset(len(train), size, derive_seed(VALIDATION_SEED, Stream.VALIDATION))
    keep = torch.ones(len(train), dtype=torch.bool)
    keep[held] = False
    rest = train.subset(torch.nonzero(keep).squeeze(1).to(train.device))
    return rest, train.subset(held.to(train.device))


def _part_sizes(n: int, parts: int | Sequence[float]) -> list[int]:
    if isinstance(parts, (int, np.integer)) and not isinstance(parts, bool):
        k = int(parts)
        if not 1 <= k <= n:
            raise ConfigError(
                f"parts must be between 1 and {n} (the number of examples) so "
                f"that every part is non-empty, got {k}"
            )
        return [n // k + (1 if i < n % k else 0) for i in range(k)]
    try:
        fractions = [float(f) for f in parts]  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise ConfigError(
            "parts must be a number of parts or a sequence of fractions "
            f"summing to 1, got {parts!r}"
        ) from None
    if not fractions or any(not math.isfinite(f) or f <= 0 for f in fractions):
        raise ConfigError(f"partition fractions must be positive, got {fractions}")
    if abs(math.fsum(fractions) - 1.0) > 1e-6:
        raise ConfigError(
            f"partition fractions must sum to 1, got {fractions} (sum {math.fsum(fractions):.8g})"
        )
    # Largest-remainder rounding: sizes sum to n and each is within 1 of fraction * n.
    exact = [f * n for f in fractions]
    sizes = [math.floor(e) for e in exact]
    order = sorted(range(len(exact)), key=lambda i: (sizes[i] - exact[i], i))
    for i in order[: n - sum(sizes)]:
        sizes[i] += 1
    empty = [fractions[i] for i, s in enumerate(sizes) if s == 0]
    if empty:
        raise ConfigError(
            f"partition fractions {empty} of n={n} examples give empty parts; "
            "use larger fractions or fewer parts"
        )
    return sizes


def random_partition(n: int, parts: int | Sequence[float], seed: int) -> list[torch.Tensor]:
    """Split the indices 0..n-1 at random into disjoint, non-empty parts that cover them.

    ``parts`` is either a number of parts (sizes differ by at most one, larger parts first)
    or a sequence of positive fractions summing to 1 (within 1e-6; sizes are rounded to sum
    to n). Each part is a sorted CPU LongTensor. Like :func:`random_subset` the split
    depends only on ``(n, parts, seed)``. Raises ``ConfigError`` for bad arguments.
    """
    n = _count(n, "n (the number of examples)")
    if n < 1:
        raise ConfigError(f"cannot partition an empty dataset (n={n})")
    sizes = _part_sizes(n, parts)
    chunks = torch.split(_permutation(n, seed), sizes)
    return [chunk.sort().values for chunk in chunks]
