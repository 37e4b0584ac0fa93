"""How many answers the Rényi filter affords Confident-GNMax at each budget ε: with every
considered query answered (the most), and at a given pass rate of the threshold step.

    python experiments/checks/pate_filter_capacity.py [--sigma1 40] [--sigma2 10] [--pass-rate 0.5]
"""

from __future__ import annotations

import argparse

from labeldp.privacy.renyi_filter import best_order_for_linear_costs, rdp_budget


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sigma1", type=float, default=40.0)
    parser.add_argument("--sigma2", type=float, default=10.0)
    parser.add_argument("--pass-rate", type=float, default=0.5)
    parser.add_argument("--delta", type=float, default=1e-5)
    args = parser.parse_args()
    check, answer = 1 / (2 * args.sigma1**2), 1 / args.sigma2**2  # RDP per unit order
    print("ε | filter order λ | RDP budget | answers, all pass | answers at pass rate")
    print("---|---|---|---|---")
    for eps in (0.5, 1, 2, 4, 8):
        order = best_order_for_linear_costs(eps, args.delta)
        per_order = rdp_budget(eps, args.delta, order) / order
        every = int(per_order / (check + answer))
        at_rate = int(per_order / (check + args.pass_rate * answer) * args.pass_rate)
        print(f"{eps:g} | {order:.2f} | {per_order * order:.4f} | {every} | {at_rate}")


if __name__ == "__main__":
    main()
