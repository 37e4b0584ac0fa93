"""Where a result came from: package version, git commit, machine, time."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

from . import __version__

_SOURCE_ROOT = Path(__file__).resolve().parent.parent


def git_commit(root: Path = _SOURCE_ROOT) -> tuple[str | None, bool | None]:
    """(commit hash, whether the tracked tree has uncommitted changes), or (None, None)
    when the package does not run from a git checkout (e.g. a wheel install)."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None, None
    return commit, bool(status)


#: The code this process runs: read once, when labeldp is imported, so a long job records
#: the commit it started from even if HEAD moves while it runs.
_STARTUP_COMMIT = git_commit()


def cpu_name() -> str:
    """The processor's model name, from /proc/cpuinfo where available."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_description() -> str:
    """E.g. "cpu: Intel Xeon ... (2 cores), torch 2.13.0+cpu" plus the GPU when present."""
    text = f"{cpu_name()} ({os.cpu_count()} cores), torch {torch.__version__}"
    if torch.cuda.is_available():
        text += f", GPU {torch.cuda.get_device_name(0)}"
    return text


def provenance() -> dict[str, Any]:
    """A JSON-able record of the code (as of this process's start) and machine that are
    producing a result."""
    commit, dirty = _STARTUP_COMMIT
    return {
        "labeldp_version": __version__,
        "git_commit": commit,
        "git_dirty": dirty,
        "machine": machine_description(),
        "hostname": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
