"""Audit item 1, as a command: Confident-GNMax's stopping rule on two neighbouring vote
histograms ([100, 0, …] and [99, 1, …]: one teacher moved its vote), T 70, σ₁ 40, σ₂ 10.

The withdrawn rule stopped on the data-dependent cost of the next step: at budget 0.3260
it answered the first histogram in 77.1 % of 2000 noise draws and the second in 0 %, an
unbounded privacy loss. The Rényi filter stops on public information only, so both are
answered as often as the threshold noise says, Pr[max + N(0, σ₁²) ≥ T] = Φ((max − T)/σ₁)
(0.773 and 0.766), or not at all when the budget cannot pay for one answer.

    python experiments/checks/pate_neighbouring_histograms.py [--draws 2000]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from scipy import stats

from labeldp.mechanisms.confident_gnmax import ConfidentGNMax


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=2000)
    args = parser.parse_args()
    agg = ConfidentGNMax(threshold=70, sigma1=40, sigma2=10)
    histograms = {"[100, 0, …]": [100] + [0] * 9, "[99, 1, …]": [99, 1] + [0] * 8}
    print("budget ε | histogram | answered | Pr[threshold passes] | binomial p-value")
    print("---|---|---|---|---")
    for budget in (0.326, 2.0, 8.0):
        for name, h in histograms.items():
            votes = np.array([h])
            answered = sum(
                bool(
                    agg.aggregate(
                        votes, torch.Generator().manual_seed(s), budget=budget
                    ).answered.any()
                )
                for s in range(args.draws)
            )
            p = agg.answer_probability(votes[0])
            pvalue = stats.binomtest(answered, args.draws, p).pvalue if answered else float("nan")
            print(f"{budget:g} | {name} | {answered / args.draws:.3f} | {p:.3f} | {pvalue:.3g}")


if __name__ == "__main__":
    main()
