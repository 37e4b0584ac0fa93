"""Pure-numpy readers for the on-disk dataset formats.

* IDX (MNIST, Fashion-MNIST): a big-endian header ``0x00 0x00 <dtype> <ndim>`` followed by
  ``ndim`` big-endian uint32 sizes and the row-major payload; only dtype 0x08 (uint8) is
  used by these datasets. The file may be gzip-compressed or raw (detected from its bytes).
* CIFAR python batches: a pickled dict with bytes keys, ``b'data'`` an (N, 3072) uint8
  array (channel-first, row-major 3x32x32) and the labels, a list of ints, under
  ``b'labels'`` (CIFAR-10) or ``b'fine_labels'`` (CIFAR-100). They are unpickled with a
  restricted unpickler that can only build numpy arrays and plain containers.

Every problem with a file raises :class:`~labeldp.errors.DataError` naming the file.
"""

from __future__ import annotations

import gzip
import os
import pickle
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from labeldp.errors import DataError

DEFAULT_FIX = "delete it and fetch the dataset again"

_IDX_UINT8 = 0x08
_GZIP_MAGIC = b"\x1f\x8b"


def read_idx(
    path: str | os.PathLike,
    *,
    ndim: int | None = None,
    fix: str = DEFAULT_FIX,
) -> np.ndarray:
    """Read an IDX file (raw or gzip-compressed) into a uint8 array of the stored shape.

    ``ndim``, if given, is the number of dimensions the file must have (3 for images,
    1 for labels). ``fix`` is appended to error messages to tell the user what to do.
    Raises ``DataError`` naming the file if it cannot be read, is not gzip/IDX, uses a
    dtype other than uint8, or its payload length differs from the product of its sizes.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(f"{path} is a corrupt or truncated gzip file ({exc}); {fix}") from exc

    expected = f"0x{_IDX_UINT8 << 8 | ndim:08x}" if ndim is not None else "0x00000803 or 0x00000801"
    if len(raw) < 4:
        raise DataError(
            f"{path} is not a valid IDX file ({len(raw)} bytes, shorter than "
            f"the 4-byte magic {expected}); {fix}"
        )
    magic = int.from_bytes(raw[:4], "big")
    zero, dtype, dims_n = magic >> 16, raw[2], raw[3]
    if zero != 0 or dtype != _IDX_UINT8 or dims_n == 0 or (ndim is not None and dims_n != ndim):
        raise DataError(
            f"{path} is not a valid IDX file (bad magic 0x{magic:08x}, expected {expected}); {fix}"
        )
    header = 4 + 4 * dims_n
    if len(raw) < header:
        raise DataError(
            f"{path} is truncated: its IDX header needs {header} bytes, the file "
            f"has {len(raw)}; {fix}"
        )
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=dims_n, offset=4))
    want = int(np.prod(shape, dtype=np.int64))
    have = len(raw) - header
    if have != want:
        what = "truncated" if have < want else "longer than its header says"
        raise DataError(
            f"{path} is {what}: shape {shape} needs {want} payload bytes, the file "
            f"has {have}; {fix}"
        )
    # Copy so the array is writable and owns its memory (torch.from_numpy needs that).
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape).copy()


def _numpy_globals() -> dict[tuple[str, str], Any]:
    """The numpy callables a pickled ndarray refers to, under old and new module names."""
    try:
        from numpy._core import multiarray, numeric  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray, numeric
    table: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }
    for module in ("numpy.core", "numpy._core"):
        table[(f"{module}.multiarray", "_reconstruct")] = multiarray._reconstruct
        table[(f"{module}.multiarray", "scalar")] = multiarray.scalar
        table[(f"{module}.numeric", "_frombuffer")] = numeric._frombuffer
    return table


_HARMLESS_BUILTINS = {
    "list": list,
    "dict": dict,
    "tuple": tuple,
    "set": set,
    "frozenset": frozenset,
    "bytes": bytes,
    "bytearray": bytearray,
    "str": str,
    "int": int,
    "float": float,
    "complex": complex,
    "bool": bool,
    "slice": slice,
    "range": range,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only numpy array constructors and plain builtin types."""

    _allowed: dict[tuple[str, str], Any] | None = None

    def __init__(self, file: Any, path: Path) -> None:
        super().__init__(file, encoding="bytes")
        self._path = path
        if _RestrictedUnpickler._allowed is None:
            allowed = _numpy_globals()
            for module in ("builtins", "__builtin__"):
                for name, obj in _HARMLESS_BUILTINS.items():
                    allowed[(module, name)] = obj
            # Python 3 writes bytes as _codecs.encode(str, 'latin1') under protocol < 3.
            import _codecs

            allowed[("_codecs", "encode")] = _codecs.encode
            _RestrictedUnpickler._allowed = allowed

    def find_class(self, module: str, name: str) -> Any:
        obj = self._allowed.get((module, name)) if self._allowed else None
        if obj is None:
            raise DataError(
                f"refusing to unpickle {module}.{name} from {self._path}: a CIFAR batch only "
                "holds numpy arrays, lists and bytes, so the file is corrupt or not a CIFAR "
                "batch; delete it and fetch the dataset again"
            )
        return obj


def read_cifar_batch(
    path: str | os.PathLike, label_key: str | bytes = "labels", *, fix: str = DEFAULT_FIX
) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR python batch file.

    ``label_key`` is ``"labels"`` (CIFAR-10) or ``"fine_labels"`` (CIFAR-100).
    Returns ``(images, labels)``: uint8 images of shape (N, 3, 32, 32) with pixel values
    0..255, and int64 labels of shape (N,) (their range is checked by the caller, who knows
    the number of classes). Raises ``DataError`` naming the file for anything unexpected,
    including pickles that reference anything but numpy arrays and plain builtins.
    """
    path = Path(path)
    key = label_key.encode() if isinstance(label_key, str) else bytes(label_key)
    try:
        with open(path, "rb") as handle:
            batch = _RestrictedUnpickler(handle, path).load()
    except DataError:
        raise
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except Exception as exc:  # pickle raises many types on corrupt input
        raise DataError(
            f"{path} is not a valid CIFAR batch ({type(exc).__name__}: {exc}); {fix}"
        ) from exc

    if not isinstance(batch, dict):
        raise DataError(
            f"{path} is not a valid CIFAR batch (holds a {type(batch).__name__}, "
            f"expected a dict); {fix}"
        )
    missing = [k for k in (b"data", key) if k not in batch]
    if missing:
        raise DataError(
            f"{path} is not a valid CIFAR batch (no {missing} key; it has "
            f"{sorted(map(repr, batch))}); {fix}"
        )
    data, labels = batch[b"data"], batch[key]
    if (
        not isinstance(data, np.ndarray)
        or data.dtype != np.uint8
        or data.ndim != 2
        or data.shape[1] != 3 * 32 * 32
    ):
        desc = (
            f"{data.dtype} array of shape {data.shape}"
            if isinstance(data, np.ndarray)
            else type(data).__name__
        )
        raise DataError(
            f"{path}: b'data' is a {desc}, expected a uint8 array of shape (N, 3072); {fix}"
        )
    try:
        labels = np.asarray(labels)
    except Exception as exc:
        raise DataError(f"{path}: {key!r} cannot be read as a list of ints; {fix}") from exc
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(
            f"{path}: {key!r} has dtype {labels.dtype} and shape {labels.shape}, "
            f"expected a list of {len(data)} ints; {fix}"
        )
    if len(labels) != len(data):
        raise DataError(f"{path}: {len(data)} images but {len(labels)} labels; {fix}")
    images = np.ascontiguousarray(data.reshape(len(data), 3, 32, 32))
    if not images.flags.writeable:
        images = images.copy()
    return images, labels.astype(np.int64)
