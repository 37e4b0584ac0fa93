"""Readers for IDX and CIFAR batch files, on small generated files in the real formats."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
from fakes import idx_bytes

from labeldp.data.formats import read_cifar_batch, read_idx
from labeldp.errors import DataError


class Py2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 ``str`` opcodes (SHORT_BINSTRING/BINSTRING), as cPickle did
    when the CIFAR batches were made."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_bytes(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_bytes


def cifar_batch(images: np.ndarray, labels: list[int], *, cifar100: bool = False) -> dict:
    n = len(images)
    batch = {
        b"batch_label": b"training batch 1 of 5",
        b"data": images.reshape(n, 3072),
        b"filenames": [b"img_%05d.png" % i for i in range(n)],
    }
    if cifar100:
        batch[b"fine_labels"] = list(labels)
        batch[b"coarse_labels"] = [label // 5 for label in labels]
    else:
        batch[b"labels"] = list(labels)
    return batch


def py2_pickle(obj: object) -> bytes:
    """Protocol-2 pickle as written by Python 2 with numpy 1.x (module numpy.core)."""
    import io

    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue().replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")


@pytest.fixture
def images() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(7, 3, 32, 32), dtype=np.uint8)


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("shape", [(5, 28, 28), (9,), (2, 3, 4, 5)])
def test_idx_round_trip(tmp_path: Path, gz: bool, shape: tuple[int, ...]) -> None:
    array = np.random.default_rng(1).integers(0, 256, size=shape, dtype=np.uint8)
    data = idx_bytes(array)
    path = tmp_path / ("x.gz" if gz else "x")
    path.write_bytes(gzip.compress(data) if gz else data)
    out = read_idx(path)
    assert out.dtype == np.uint8 and out.shape == shape and out.flags.writeable
    np.testing.assert_array_equal(out, array)
    assert read_idx(path, ndim=len(shape)).shape == shape


@pytest.mark.parametrize(
    ("mangle", "fragment"),
    [
        (lambda d: b"\x00\x00\x09\x03" + d[4:], "bad magic 0x00000903"),  # int8 dtype code
        (lambda d: b"\x12\x34" + d[2:], "bad magic 0x12340803"),
        (lambda d: d[:-1], "truncated"),
        (lambda d: d + b"\x00", "longer than its header says"),
        (lambda d: d[:6], "truncated"),
        (lambda d: d[:2], "shorter than the 4-byte magic"),
    ],
)
def test_idx_corrupt_names_file(tmp_path: Path, mangle, fragment: str) -> None:
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(mangle(idx_bytes(np.zeros((2, 28, 28), np.uint8))))
    with pytest.raises(DataError, match=fragment) as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_idx_wrong_ndim_and_fix_hint(tmp_path: Path) -> None:
    path = tmp_path / "labels"
    path.write_bytes(idx_bytes(np.zeros(4, np.uint8)))
    with pytest.raises(DataError, match=r"bad magic 0x00000801, expected 0x00000803.*run it"):
        read_idx(path, ndim=3, fix="run it")


def test_idx_bad_gzip(tmp_path: Path) -> None:
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    good = gzip.compress(idx_bytes(np.zeros((3, 28, 28), np.uint8)))
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match="corrupt or truncated gzip") as info:
        read_idx(path)
    assert str(path) in str(info.value)
    path.write_bytes(good[:10] + b"\xff" * 20 + good[30:])
    with pytest.raises(DataError, match=str(path).replace("\\", "\\\\")):
        read_idx(path)


def test_idx_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cannot read"):
        read_idx(tmp_path / "nope.gz")


@pytest.mark.parametrize("style", ["py3", "py2"])
def test_cifar10_round_trip(tmp_path: Path, images: np.ndarray, style: str) -> None:
    labels = [3, 1, 4, 1, 5, 9, 2]
    batch = cifar_batch(images, labels)
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps(batch, protocol=2) if style == "py3" else py2_pickle(batch))
    got_images, got_labels = read_cifar_batch(path, "labels")
    assert got_images.dtype == np.uint8 and got_images.shape == (7, 3, 32, 32)
    assert got_images.flags.writeable and got_images.flags.c_contiguous
    np.testing.assert_array_equal(got_images, images)
    assert got_labels.dtype == np.int64 and got_labels.tolist() == labels


def test_py2_pickle_emulates_real_files(images: np.ndarray) -> None:
    data = py2_pickle(cifar_batch(images, [0] * 7))
    assert b"cnumpy.core.multiarray\n_reconstruct\n" in data and b"numpy._core" not in data
    assert b"_codecs" not in data  # keys are Python 2 str opcodes, not encode() calls


def test_cifar100_fine_labels(tmp_path: Path, images: np.ndarray) -> None:
    labels = [99, 0, 50, 7, 8, 9, 10]
    path = tmp_path / "train"
    path.write_bytes(py2_pickle(cifar_batch(images, labels, cifar100=True)))
    _, got = read_cifar_batch(path, b"fine_labels")
    assert got.tolist() == labels
    with pytest.raises(DataError, match="labels") as info:
        read_cifar_batch(path, "labels")
    assert str(path) in str(info.value)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


def test_malicious_pickle_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": _Evil(), b"labels": []}, protocol=2))
    with pytest.raises(DataError, match="refusing to unpickle") as info:
        read_cifar_batch(path, "labels")
    assert str(path) in str(info.value) and "system" in str(info.value)
    assert not (tmp_path / "pwned.txt").exists()


@pytest.mark.parametrize("target", ["builtins.eval", "subprocess.Popen", "numpy.load"])
def test_other_globals_refused(tmp_path: Path, target: str) -> None:
    module, name = target.rsplit(".", 1)
    path = tmp_path / "b"
    path.write_bytes(b"\x80\x02c" + f"{module}\n{name}\n".encode() + b")R.")
    with pytest.raises(DataError, match=f"refusing to unpickle {target}"):
        read_cifar_batch(path)


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"not a pickle at all", "not a valid CIFAR batch"),
        (pickle.dumps([1, 2, 3], protocol=2), "expected a dict"),
        (pickle.dumps({b"labels": [1]}, protocol=2), "b'data'"),
        (
            pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, protocol=2),
            r"shape \(N, 3072\)",
        ),
        (
            pickle.dumps({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}, protocol=2),
            "float32",
        ),
        (
            pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, protocol=2),
            "2 images but 1 labels",
        ),
        (
            pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [b"x"]}, protocol=2),
            "expected a list of 1 ints",
        ),
    ],
)
def test_cifar_invalid(tmp_path: Path, content: bytes, fragment: str) -> None:
    path = tmp_path / "data_batch_3"
    path.write_bytes(content)
    with pytest.raises(DataError, match=fragment) as info:
        read_cifar_batch(path, "labels")
    assert str(path) in str(info.value)


def test_cifar_truncated(tmp_path: Path, images: np.ndarray) -> None:
    data = py2_pickle(cifar_batch(images, [0] * 7))
    path = tmp_path / "test_batch"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="not a valid CIFAR batch") as info:
        read_cifar_batch(path, "labels")
    assert str(path) in str(info.value)
