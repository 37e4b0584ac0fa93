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
    """(commit hash, whether the tracked tree outside results/ has uncommitted changes),
    or (None, None) when the package does not run from a git checkout, i.e. when ``root``
    (the folder holding the labeldp package) is not the top of a git work tree: e.g. a
    wheel install, even one into a virtual environment inside some checkout (whose
    commit says nothing about the installed code)."""
    try:
        top, commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--show-toplevel", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.splitlines()  # one line each: a folder's name may hold spaces
        if Path(top).resolve() != Path(root).resolve():
            return None, None
        status = subprocess.run(
            # the results store and tables are outputs, not code: a sweep that writes
            # results/runs.sqlite must not mark its own later runs dirty
            [
                "git",
                "-C",
                str(root),
                "status",
                "--porcelain",
                "--untracked-files=no",
                "--",
                ".",
                ":(exclude)results",
            ],  # fmt: skip
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError, ValueError):
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


#: CPU runs flush denormal floats to zero (:func:`cpu_numerics`): a model driven to tiny
#: activations (a student fitting one label) otherwise ran 15 times slower on x86.
FLUSH_DENORMAL = True


def cpu_numerics() -> None:
    """Sets the process's CPU floating-point mode for training: denormals flushed to zero
    (``torch.set_flush_denormal``), recorded in :func:`numerics`. Called by every run."""
    torch.set_flush_denormal(FLUSH_DENORMAL)


def numerics(device: torch.device | str | None = None) -> dict[str, Any]:
    """What changes a result's floating-point arithmetic beyond its configuration: the
    torch version, its intra-op thread count (it changes the order of reductions: lp-2st
    at ε = 4 moved from 18.61 % to 22.51 % between one and two sweep workers), the device
    and, on CUDA, the CUDA and cuDNN versions. A sweep refuses to mix runs whose
    ``numerics`` differ (``--allow-mixed-numerics`` accepts it)."""
    device = torch.device(device if device is not None else "cpu")
    out: dict[str, Any] = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": device.type,
    }
    if device.type == "cpu":
        out["flush_denormal"] = FLUSH_DENORMAL
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        out["device"] = f"cuda ({torch.cuda.get_device_name(index)})"
        out["cuda"] = torch.version.cuda
        out["cudnn"] = torch.backends.cudnn.version()
    return out


def describe_numerics(settings: dict[str, Any] | None) -> str:
    """E.g. "torch 2.5.1, 2 threads, cpu"; "unknown" for a run that did not record them."""
    if not settings:
        return "unknown"
    text = f"torch {settings.get('torch')}, {settings.get('threads')} threads, "
    text += str(settings.get("device"))
    extra = [
        f"{k} {settings[k]}" for k in sorted(settings) if k not in ("torch", "threads", "device")
    ]
    return ", ".join([text, *extra])


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
