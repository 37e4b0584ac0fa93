"""DeviceDataset, load_splits and the label-independent index utilities."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from fakes import isolate_data_sources, write_idx

from labeldp.data import (
    DATASETS,
    DeviceDataset,
    load_splits,
    random_partition,
    random_subset,
    sources,
)
from labeldp.errors import ConfigError, DataError

FASHION = DATASETS["fashion-mnist"]
DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    isolate_data_sources(monkeypatch, tmp_path)


def small(n: int = 10, classes: int = 10) -> DeviceDataset:
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 28, 28).clone()
    return DeviceDataset(images, torch.arange(n) % classes, FASHION)


# --- DeviceDataset ---------------------------------------------------------------------


def test_device_dataset_basics() -> None:
    ds = small()
    assert len(ds) == 10 and ds.device == torch.device("cpu") and ds.info is FASHION
    assert ds.to("cpu").images.data_ptr() == ds.images.data_ptr()
    assert "fashion-mnist" in repr(ds)


@pytest.mark.parametrize(
    ("images", "labels", "error", "fragment"),
    [
        (
            np.zeros((2, 1, 28, 28), np.uint8),
            torch.zeros(2, dtype=torch.long),
            ConfigError,
            "torch tensors",
        ),
        (
            torch.zeros(2, 1, 28, 28),
            torch.zeros(2, dtype=torch.long),
            ConfigError,
            r"torch.uint8 of shape \(N, 1, 28, 28\), got torch.float32",
        ),
        (
            torch.zeros(2, 28, 28, dtype=torch.uint8),
            torch.zeros(2, dtype=torch.long),
            ConfigError,
            r"got torch.uint8 of shape \(2, 28, 28\)",
        ),
        (
            torch.zeros(2, 3, 32, 32, dtype=torch.uint8),
            torch.zeros(2, dtype=torch.long),
            ConfigError,
            r"\(N, 1, 28, 28\)",
        ),
        (
            torch.zeros(2, 1, 28, 28, dtype=torch.uint8),
            torch.zeros(2, dtype=torch.int32),
            ConfigError,
            "labels must be torch.int64",
        ),
        (
            torch.zeros(2, 1, 28, 28, dtype=torch.uint8),
            torch.zeros(2, 1, dtype=torch.long),
            ConfigError,
            r"shape \(2, 1\)",
        ),
        (
            torch.zeros(2, 1, 28, 28, dtype=torch.uint8),
            torch.zeros(3, dtype=torch.long),
            DataError,
            "2 images but 3 labels",
        ),
        (
            torch.zeros(0, 1, 28, 28, dtype=torch.uint8),
            torch.zeros(0, dtype=torch.long),
            DataError,
            "no examples",
        ),
        (
            torch.zeros(2, 1, 28, 28, dtype=torch.uint8),
            torch.tensor([0, 10]),
            DataError,
            r"0\.\.9, found values from 0 to 10",
        ),
        (
            torch.zeros(2, 1, 28, 28, dtype=torch.uint8),
            torch.tensor([-1, 3]),
            DataError,
            "from -1 to 3",
        ),
    ],
)
def test_device_dataset_validation(images, labels, error, fragment: str) -> None:
    with pytest.raises(error, match=fragment):
        DeviceDataset(images, labels, FASHION)


def test_subset() -> None:
    ds = small()
    sub = ds.subset(torch.tensor([7, 2, 2]))
    assert len(sub) == 3 and sub.labels.tolist() == [7, 2, 2]
    assert sub.images[:, 0, 0, 0].tolist() == [7, 2, 2]
    assert ds.subset(torch.tensor([1, 3], dtype=torch.int32)).labels.tolist() == [1, 3]
    with pytest.raises(ConfigError, match=r"0\.\.9, found values from 0 to 10"):
        ds.subset(torch.tensor([0, 10]))
    with pytest.raises(ConfigError, match="from -1"):
        ds.subset(torch.tensor([-1]))
    with pytest.raises(ConfigError, match="empty"):
        ds.subset(torch.tensor([], dtype=torch.long))
    with pytest.raises(ConfigError, match="1-D integer tensor"):
        ds.subset(torch.tensor([True, False]))
    with pytest.raises(ConfigError, match="1-D integer tensor"):
        ds.subset([1, 2])  # type: ignore[arg-type]


# --- load_splits -----------------------------------------------------------------------


def test_load_splits_idx(tmp_path: Path) -> None:
    folder = tmp_path / "dd" / "mnist"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    train_images = rng.integers(0, 256, (12, 28, 28), dtype=np.uint8)
    write_idx(folder / "train-images-idx3-ubyte.gz", train_images)
    write_idx(folder / "train-labels-idx1-ubyte.gz", np.arange(12) % 10)
    write_idx(folder / "t10k-images-idx3-ubyte.gz", np.zeros((4, 28, 28), np.uint8))
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", np.array([9, 8, 7, 6]))
    train, test = load_splits("mnist", data_dir=tmp_path / "dd", download=False)
    assert train.info.name == "mnist" and train.images.shape == (12, 1, 28, 28)
    assert torch.equal(train.images[:, 0], torch.from_numpy(train_images))
    assert train.labels.dtype == torch.int64 and test.labels.tolist() == [9, 8, 7, 6]

    write_idx(folder / "t10k-labels-idx1-ubyte.gz", np.array([9, 8, 7]))
    with pytest.raises(DataError, match="holds 4 images but .* holds 3 labels"):
        load_splits("mnist", data_dir=tmp_path / "dd", download=False)
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", np.array([9, 8, 7, 10]))
    with pytest.raises(DataError, match=r"labels must lie in 0\.\.9"):
        load_splits("mnist", data_dir=tmp_path / "dd", download=False)
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", np.zeros((4, 1)))
    with pytest.raises(DataError, match="expected 0x00000801.*labeldp data fetch mnist"):
        load_splits("mnist", data_dir=tmp_path / "dd", download=False)


def test_load_splits_cifar100(tmp_path: Path) -> None:
    folder = tmp_path / "dd" / "cifar-100-python"
    folder.mkdir(parents=True)
    for name, n in (("train", 6), ("test", 2)):
        batch = {
            b"batch_label": name.encode(),
            b"filenames": [b"x.png"] * n,
            b"fine_labels": [99 - i for i in range(n)],
            b"coarse_labels": [0] * n,
            b"data": np.full((n, 3072), n, np.uint8),
        }
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    train, test = load_splits("cifar100", data_dir=tmp_path / "dd", download=False)
    assert train.images.shape == (6, 3, 32, 32) and test.labels.tolist() == [99, 98]


def test_load_splits_unknown_and_missing(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="known datasets"):
        load_splits("imagenet")
    with pytest.raises(DataError, match="labeldp data fetch mnist"):
        load_splits("mnist", data_dir=tmp_path, download=False)


@pytest.mark.skipif(not DEBIAN_FASHION.is_dir(), reason="dataset-fashion-mnist not installed")
def test_load_splits_real_fashion_mnist(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources, "DEBIAN_DIRS", {"fashion-mnist": DEBIAN_FASHION})
    train, test = load_splits("fashion-mnist", download=False)
    assert (len(train), len(test)) == (60000, 10000)
    assert train.images.shape == (60000, 1, 28, 28) and train.images.dtype == torch.uint8
    assert torch.bincount(train.labels).tolist() == [6000] * 10
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    mean = train.images.float().mean().item() / 255
    assert abs(mean - FASHION.mean[0]) < 1e-3


# --- index utilities -------------------------------------------------------------------


def test_random_subset() -> None:
    a = random_subset(1000, 100, seed=3)
    assert a.dtype == torch.int64 and len(a) == 100 and len(set(a.tolist())) == 100
    assert torch.equal(a, a.sort().values) and 0 <= a.min() and a.max() < 1000
    assert torch.equal(a, random_subset(1000, 100, seed=3))
    assert not torch.equal(a, random_subset(1000, 100, seed=4))
    assert random_subset(5, 5, seed=0).tolist() == [0, 1, 2, 3, 4]
    # fixed across machines and runs: a seeded CPU generator
    assert random_subset(10, 3, seed=0).tolist() == [1, 4, 7]


@pytest.mark.parametrize("size", [0, -1, 11])
def test_random_subset_bad_size(size: int) -> None:
    with pytest.raises(ConfigError, match=r"size \(--train-size\) must be between 1 and 10"):
        random_subset(10, size, seed=0)


def test_random_subset_bad_types() -> None:
    with pytest.raises(ConfigError, match="must be an integer"):
        random_subset(10, 2.5, seed=0)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="seed"):
        random_subset(10, 2, seed=-1)
    with pytest.raises(ConfigError, match="empty"):
        random_subset(0, 1, seed=0)


@pytest.mark.parametrize("parts", [1, 3, 7, [0.5, 0.3, 0.2], (0.1,) * 10, [1 / 3] * 3])
def test_random_partition_covers(parts) -> None:
    n = 101
    chunks = random_partition(n, parts, seed=5)
    joined = torch.cat(chunks)
    assert sorted(joined.tolist()) == list(range(n))  # disjoint and covering
    assert all(len(c) > 0 and torch.equal(c, c.sort().values) for c in chunks)
    assert all(c.dtype == torch.int64 for c in chunks)
    again = random_partition(n, parts, seed=5)
    assert all(torch.equal(x, y) for x, y in zip(chunks, again, strict=True))
    other = random_partition(n, parts, seed=6)
    assert len(chunks) == 1 or any(
        not torch.equal(x, y) for x, y in zip(chunks, other, strict=True)
    )


def test_random_partition_sizes() -> None:
    assert [len(c) for c in random_partition(10, 3, seed=0)] == [4, 3, 3]
    assert [len(c) for c in random_partition(10, [0.55, 0.45], seed=0)] == [6, 4]
    assert [len(c) for c in random_partition(100, [0.5, 0.3, 0.2], seed=0)] == [50, 30, 20]
    sizes = [len(c) for c in random_partition(10, [1 / 3] * 3, seed=0)]
    assert sum(sizes) == 10 and max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize(
    ("n", "parts", "fragment"),
    [
        (10, 0, "between 1 and 10"),
        (10, 11, "between 1 and 10"),
        (10, [0.5, 0.4], "sum to 1"),
        (10, [0.5, 0.6, -0.1], "positive"),
        (10, [], "positive"),
        (10, [0.99, 0.01], "empty parts"),
        (10, "abc", "fractions"),
        (0, 2, "empty dataset"),
    ],
)
def test_random_partition_errors(n: int, parts, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        random_partition(n, parts, seed=0)


def test_partition_tolerance() -> None:
    assert len(random_partition(10, [0.5, 0.5 + 5e-7], seed=0)) == 2
    with pytest.raises(ConfigError):
        random_partition(10, [0.5, 0.5 + 5e-6], seed=0)
