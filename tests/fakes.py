"""Small dataset files in the real on-disk formats, for tests (no real data needed)."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from labeldp.data import sources
from labeldp.records import PROVENANCE_KEYS, AttackRecord, RunRecord
from labeldp.runner import Environment, RunConfig, train_run
from labeldp.train import TrainConfig


def idx_bytes(array: np.ndarray) -> bytes:
    """An uncompressed IDX file holding a uint8 array."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_idx(path: Path, array: np.ndarray) -> Path:
    """Writes ``array`` as IDX to ``path``, gzip-compressed when the name ends in .gz."""
    data = idx_bytes(array)
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def write_mnist_like(folder: Path, fill: int = 0, *, gz: bool = True, n: int = 6) -> Path:
    """Small IDX files in ``folder``; every pixel is ``fill`` so tests can tell copies apart."""
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": np.full((n, 28, 28), fill, np.uint8),
        "train-labels-idx1-ubyte": np.arange(n, dtype=np.uint8) % 10,
        "t10k-images-idx3-ubyte": np.full((n // 2, 28, 28), fill, np.uint8),
        "t10k-labels-idx1-ubyte": np.arange(n // 2, dtype=np.uint8) % 10,
    }
    for name, array in arrays.items():
        write_idx(folder / (f"{name}.gz" if gz else name), array)
    return folder


def write_learnable_fashion(
    folder: Path, n_train: int = 400, n_test: int = 200, seed: int = 0
) -> Path:
    """A tiny Fashion-MNIST-format dataset a model learns in a few steps (without random
    crops, which would move the bars): class k is a bright horizontal bar at rows
    2k+4..2k+5 of a noisy image (flip-invariant)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        for k in range(10):
            images[labels == k, 2 * k + 4 : 2 * k + 6, 2:26] = 250
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return folder


def isolate_data_sources(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No $LABELDP_DATA, no system folders, and a download cache inside ``tmp_path``;
    returns the cache folder."""
    monkeypatch.delenv("LABELDP_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(sources, "DEBIAN_DIRS", {})
    return tmp_path / "xdg" / "labeldp"


def two_class_halves(n: int = 512, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Toy images (n, 1, 8, 8) uint8 and labels (n,): class 1 has the brighter left half,
    class 0 the brighter right half (a linear model learns it in a few steps)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=g)
    images = torch.randint(0, 100, (n, 1, 8, 8), generator=g, dtype=torch.uint8)
    bright = images[:, :, :, :4].clone() + 120
    images[labels == 1, :, :, :4] = bright[labels == 1]
    images[labels == 0, :, :, 4:] = bright[labels == 0]
    return images, labels


def tiny_run(data_dir, out, method, epochs=2, resume=False, **options):
    """A run of ``method`` (options as keywords) on the fake Fashion-MNIST in ``data_dir``:
    batch 50, no crops, no download or progress; returns its metrics."""
    config = RunConfig(
        dataset="fashion-mnist",
        train=TrainConfig(epochs=epochs, batch_size=50),
        method=method,
        method_options=options,
        crop_padding=0,
    )
    env = Environment(data_dir=str(data_dir), download=False, progress=False)
    return train_run(config, out, env, resume=resume)


def run_record(**fields) -> RunRecord:
    """A :class:`RunRecord` for tests that store runs without training: a finished
    non-private run with placeholder values, ``fields`` replacing them (epsilon None:
    non-private)."""
    values = {
        "dataset": "fashion-mnist",
        "method": "none",
        "method_options": {},
        "method_details": {},
        "model": "cnn",
        "train_size": 100,
        "test_accuracy": 0.5,
        "epsilon": None,
        "delta": None,
        "ledger": {"entries": []},
        "train_seconds": 1.0,
        "eval_seconds": 0.0,
        "session_wall_seconds": 1.0,
        "resumed_from_epoch": 0,
        "device": "cpu",
        "history": [],
        "diagnostics": {},
        **dict.fromkeys(PROVENANCE_KEYS),
        **fields,
    }
    return RunRecord.from_json(values)


def attack_record(**fields) -> AttackRecord:
    """An :class:`AttackRecord` for tests that store runs without attacking them:
    placeholder values, ``fields`` replacing them."""
    values = {
        "run": "run",
        "method": "none",
        "epsilon": None,
        "delta": None,
        "alpha": 0.05,
        "memorization": None,
        "one_run": None,
        "label_inference": {"gap": 0.0},
        **fields,
    }
    return AttackRecord.from_json(values)


def count_calls(monkeypatch: pytest.MonkeyPatch, cls: type, name: str = "privatize") -> list:
    """Wraps ``cls.name`` so that each call appends to the returned list."""
    calls = []
    original = getattr(cls, name)

    def counted(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, name, counted)
    return calls


def finished_runs(folder: Path) -> dict[str, int]:
    """name → metrics.json's mtime (ns) of every finished run folder under ``folder``
    (a sweep's runs): to check that a rerun redoes none of them."""
    return {
        run.name: (run / "metrics.json").stat().st_mtime_ns
        for run in sorted(folder.iterdir())
        if (run / "metrics.json").exists()
    }
