"""Learning-rate schedules as pure functions of the step, so a resumed run needs no
scheduler state."""

from __future__ import annotations

import math


def learning_rate(
    step: int, total_steps: int, peak: float, kind: str, warmup_fraction: float
) -> float:
    """The learning rate for optimizer step ``step`` (0-based) of ``total_steps``.

    ``kind``: "onecycle" (linear warm-up then linear decay to 0), "cosine" (linear warm-up
    then cosine decay to 0), "fixmatch" (linear warm-up then FixMatch's cosine,
    peak·cos(7π·k / (16·K)) at step k of the K after warm-up, which ends at
    cos(7π/16)·peak ≈ 0.195·peak rather than 0; Sohn et al. 2020) or "constant".
    ``warmup_fraction`` in [0, 1) is the share of steps spent warming up from
    ``peak / warmup_steps`` to ``peak``.
    """
    if kind == "constant":
        return peak
    warmup = int(warmup_fraction * total_steps)
    if step < warmup:
        return peak * (step + 1) / warmup
    remaining = max(total_steps - warmup, 1)
    progress = min((step - warmup) / remaining, 1.0)
    if kind == "onecycle":
        return peak * (1.0 - progress)
    if kind == "cosine":
        return peak * 0.5 * (1.0 + math.cos(math.pi * progress))
    if kind == "fixmatch":
        return peak * math.cos(7 * math.pi * progress / 16)
    raise ValueError(f"unknown schedule {kind!r}")
