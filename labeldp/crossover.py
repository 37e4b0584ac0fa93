"""The crossover ε*: where a randomized-label method overtakes a gradient-noise method.

At small ε the methods that randomize labels (rr, lp-2st, lp-mst, alibi) lose to methods
that add noise to gradients (labeldp-pro; dp-sgd), at large ε they win (LabelDP-Pro,
Ghazi et al. 2024, finds ε* ≈ 1–1.3 for 10 classes). Given two accuracy curves on a
shared ε grid, :func:`crossover` finds where the difference d(ε) = acc_challenger(ε) −
acc_incumbent(ε) turns positive for good: after the last grid point with d ≤ 0, and
interpolates d linearly in log ε between that point and the next. Accuracies are means over
seeds: a crossing whose neighbouring differences are within the seeds' spread is a rough
estimate, which the report says beside it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from .errors import ConfigError

#: The methods that train on randomized labels (the "RR family" of the crossover).
RANDOMIZED_LABEL_METHODS = ("rr", "lp-2st", "lp-mst", "alibi")


@dataclass(frozen=True)
class Crossing:
    """Where ``challenger`` overtakes ``incumbent`` on the ε grid ``epsilons``.

    kind: "between" (ε* interpolated between ``below`` and ``above``), "below_grid" (the
    challenger is ahead at every ε of the grid: ε* < the smallest), "above_grid" (never
    ahead at the largest ε: ε* > the largest). epsilon: ε* for "between", else None.
    below, above: the grid points around ε* (None where the grid ends).
    """

    challenger: str
    incumbent: str
    kind: str
    epsilon: float | None
    below: float | None
    above: float | None

    def text(self) -> str:
        """ε* as the report prints it."""
        if self.kind == "between":
            return f"{self.epsilon:.2f} (between ε = {self.below:g} and {self.above:g})"
        if self.kind == "below_grid":
            return f"< {self.above:g} (ahead at every ε of the grid)"
        return f"> {self.below:g} (not ahead at any ε of the grid's top)"


def crossover(
    challenger: Mapping[float, float], incumbent: Mapping[float, float],
    names: tuple[str, str] = ("challenger", "incumbent"),
) -> Crossing:  # fmt: skip
    """ε* at which ``challenger`` (ε → accuracy) overtakes ``incumbent`` for good, on the ε
    values both have (at least one; each ε > 0): after the largest shared ε where the
    challenger is not ahead (d ≤ 0), d interpolated linearly in log ε to its zero."""
    shared = sorted(set(challenger) & set(incumbent))
    if not shared:
        raise ConfigError(f"{names[0]} and {names[1]} share no ε to compare")
    if shared[0] <= 0 or not all(math.isfinite(e) for e in shared):
        raise ConfigError(f"the ε values must be finite and > 0, got {shared}")
    d = [challenger[e] - incumbent[e] for e in shared]
    behind = [i for i, v in enumerate(d) if v <= 0]
    if not behind:
        return Crossing(*names, "below_grid", None, None, shared[0])
    last = behind[-1]
    if last == len(shared) - 1:
        return Crossing(*names, "above_grid", None, shared[-1], None)
    lo, hi = shared[last], shared[last + 1]
    t = -d[last] / (d[last + 1] - d[last])  # in [0, 1): d[last] ≤ 0 < d[last + 1]
    star = math.exp(math.log(lo) + t * (math.log(hi) - math.log(lo)))
    return Crossing(*names, "between", star, lo, hi)
