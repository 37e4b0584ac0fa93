"""What every benchmark in experiments/perf writes: results/perf/<name>-<cpu|cuda>.json
with the measurements and their provenance, and a Markdown page that starts with the
command, commit, machine and date."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any

import torch

from labeldp.io import atomic_write_json, atomic_write_text
from labeldp.provenance import provenance
from labeldp.train import device_description


def write_benchmark(
    name: str,
    title: str,
    device: torch.device,
    measurements: dict[str, Any],
    setup: list[str],
    table: list[str],
    argv: list[str] | None,
    out_dir: str | Path,
) -> Path:
    """Writes ``<out_dir>/<name>-<tag>.json`` and ``.md``; returns the .md path.

    measurements: the numbers (JSON-able). setup: Markdown bullet lines saying what was
    measured. table: the Markdown lines of the result."""
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])])
    record = {
        "benchmark": name,
        "command": command,
        "device": device_description(device),
        **measurements,
        **provenance(),
    }
    tag = "cuda" if device.type == "cuda" else "cpu"
    out = Path(out_dir)
    atomic_write_json(out / f"{name}-{tag}.json", record)
    lines = [
        f"# {title} ({tag})",
        "",
        f"- command: `{command}`",
        f"- commit: {record['git_commit']}{' (dirty)' if record['git_dirty'] else ''}",
        f"- machine: {record['machine']}; device: {record['device']}",
        f"- date: {record['date']}",
        *setup,
        "",
        *table,
    ]
    path = out / f"{name}-{tag}.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    print("\n".join(lines))
    return path
