"""Atomic file writes: a reader sees the old file or the new one, never half of one.

A write that fails because the disk (or the quota) is full raises :class:`DiskFullError`
naming the file, whatever layer saw the failure (torch.save reports it as a RuntimeError
whose context is the OSError); :func:`read_json` turns an unreadable JSON file into a
one-line :class:`~labeldp.errors.DataError` naming it and what to do.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from .errors import DataError, LabelDPError

_FULL = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(LabelDPError):
    """Writing ``path`` failed because the disk or the quota is full; nothing was
    replaced (the previous version of the file, if any, is intact)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        super().__init__(f"the disk is full: writing {path} failed (nothing was overwritten)")


def _disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` or an exception it was raised from is an OSError for a full disk."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _FULL:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _umask() -> int:
    """The process's umask: from /proc where it can be read without changing it (other
    threads may be creating files), else by setting it and putting it back."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Write ``path`` atomically: ``write`` fills a temporary file in the same folder,
    which is flushed, fsynced and renamed over ``path``. Returns the path.

    A full disk raises :class:`DiskFullError` (the temporary file is removed)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        if _disk_full(exc):
            raise DiskFullError(path) from exc
        raise
    try:
        # mkstemp creates the file 0600; give it the mode open() would (0666 & ~umask).
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if _disk_full(exc):
            raise DiskFullError(path) from exc
        raise
    return path


def read_json(path: str | os.PathLike, what_to_do: str) -> Any:
    """The JSON content of ``path``; a file that is not valid JSON (truncated, say) is a
    :class:`~labeldp.errors.DataError` naming it, followed by ``what_to_do``."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        if isinstance(exc, json.JSONDecodeError):
            detail = f"not valid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
        else:
            detail = "not UTF-8 text"
        raise DataError(f"{path} is corrupt ({detail}); {what_to_do}") from None


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 text to ``path`` atomically."""
    return atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically (NaN/inf are refused: write
    a record's ``to_json()``, or :func:`labeldp.records.to_json_value` of ``obj``, which
    follow the one convention for ∞ in labeldp's JSON files)."""
    return atomic_write_text(
        path, json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n"
    )
