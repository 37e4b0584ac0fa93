"""Exclusive locks on run folders: one process at a time trains a run.

Two processes training the same run folder would randomize the labels twice while the
folder records ε once (and a sweep started twice would train every grid point twice).
:func:`folder_lock` takes an ``flock`` on ``<folder>/.lock`` for as long as the ``with``
block runs. The kernel releases it when the process exits, however it exits (``kill -9``
included), so a stale lock never blocks a rerun. The lock is re-entrant within one
process (a sweep holds a grid point's lock around ``train_run``, which takes it again).
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import ConfigError

#: The lock file inside a locked folder (kept after release: removing it would race).
LOCK_NAME = ".lock"

#: Folders this process holds locked: resolved path -> nesting depth.
_HELD: dict[str, int] = {}


class FolderLocked(ConfigError):
    """Another process holds the lock of ``folder`` (its pid ``holder``, "?" if unknown)."""

    def __init__(self, folder: Path, holder: str) -> None:
        self.folder, self.holder = folder, holder
        super().__init__(
            f"{folder} is in use by another process (pid {holder}); wait for it to finish, "
            "or choose another folder"
        )


@contextmanager
def folder_lock(folder: str | Path) -> Iterator[Path]:
    """Holds an exclusive lock on ``folder`` (created if absent) for the ``with`` block;
    raises :class:`FolderLocked` at once, naming the holder's pid, when another process
    holds it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key = str(folder.resolve())
    if key in _HELD:
        _HELD[key] += 1
        try:
            yield folder
        finally:
            _HELD[key] -= 1
        return
    fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise FolderLocked(folder, holder) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _HELD[key] = 1
        try:
            yield folder
        finally:
            del _HELD[key]
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
