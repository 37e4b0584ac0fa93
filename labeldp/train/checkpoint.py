"""The one checkpoint helper of the training loops: written atomically, read back with
``torch.load(weights_only=True)``, refused when written by another configuration.

A checkpoint is a dict of tensors, numbers, strings and containers of them (what
``weights_only`` loads) holding ``format`` (:data:`CHECKPOINT_FORMAT`) and
``fingerprint`` (a JSON-able description of the run that wrote it); the rest belongs to
the loop that wrote it (:class:`~labeldp.train.Trainer`,
:func:`~labeldp.train.ensemble.train_fixmatch_ensemble`). A loop whose older files lack a
``fingerprint`` passes ``upgrade`` to read them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from ..io import atomic_write

#: The ``format`` entry of every checkpoint the loops write.
CHECKPOINT_FORMAT = 1

State = dict[str, Any]


def save_checkpoint(path: str | Path, state: State) -> Path:
    """Writes ``state`` to ``path`` atomically (temporary file, fsync, rename: a reader
    or a resumed run sees the previous checkpoint or this one, never half of one; a full
    disk raises :class:`~labeldp.io.DiskFullError`). Returns the path."""
    return atomic_write(path, lambda handle: torch.save(state, handle))


def check_fingerprint(state: State, fingerprint: Any, mismatch: str) -> None:
    """Refuses (:class:`~labeldp.errors.ConfigError` with message ``mismatch``) a
    checkpoint ``state`` whose fingerprint differs from ``fingerprint``."""
    if state.get("fingerprint") != fingerprint:
        raise ConfigError(mismatch)


def load_checkpoint(
    path: str | Path,
    *,
    fingerprint: Any,
    device: torch.device | str,
    mismatch: str,
    upgrade: Callable[[State], State] | None = None,
) -> State:
    """The checkpoint at ``path``, its tensors on ``device``, loaded with
    ``weights_only=True`` (no code runs from the file), after ``upgrade`` (an older
    layout to the current one) and the fingerprint check (:func:`check_fingerprint`)."""
    state = torch.load(path, map_location=device, weights_only=True)
    if upgrade is not None:
        state = upgrade(state)
    check_fingerprint(state, fingerprint, mismatch)
    return state


__all__ = [
    "CHECKPOINT_FORMAT",
    "check_fingerprint",
    "load_checkpoint",
    "save_checkpoint",
]
