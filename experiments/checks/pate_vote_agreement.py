"""Where PATE-FM's answers go wrong: the teachers' noiseless vote, binned by how many
teachers agree on it, against the true training labels of the query pool (a diagnostic
outside the guarantee, read from a finished pate-fm run folder).

For each bin of the top vote count: how many pool queries fall in it, the accuracy of the
noiseless plurality there, and the class histogram of their true labels. When queries on
which (nearly) all teachers agree are still often wrong, or such queries miss whole
classes, the teachers, not the aggregation's noise, bound the answers' accuracy.

    python experiments/checks/pate_vote_agreement.py runs/fashion_mnist_full/pate-fm-eps8-seed0

The run must train on the whole training split (no ``train_size`` or ``validation_size``),
so that its train positions are the dataset's.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from labeldp.data import load_splits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--bins", default="0,0.5,0.7,0.9,0.975,1.0001",
                        help="bin edges as shares of the teachers")  # fmt: skip
    args = parser.parse_args()
    config = json.loads((args.run_dir / "config.json").read_text())["run"]
    if config["method"] != "pate-fm":
        raise SystemExit(f"{args.run_dir} is a {config['method']} run, not pate-fm")
    if config.get("train_size") or config.get("validation_size"):
        raise SystemExit("the run trains on part of the training split; positions differ")
    votes = torch.load(args.run_dir / "diagnostics" / "pate_votes.pt", weights_only=True).numpy()
    pool = torch.load(args.run_dir / "pate.noisy.pt", weights_only=True)[2].numpy()
    train, _ = load_splits(config["dataset"])
    truth = train.labels.numpy()[pool]
    teachers = config["method_options"]["teachers"]
    top, right = votes.max(1), votes.argmax(1) == truth
    edges = [float(x) * teachers for x in args.bins.split(",")]
    k = votes.shape[1]
    print(f"{len(pool)} pool queries, {teachers} teachers; noiseless plurality right on "
          f"{right.mean():.1%}")  # fmt: skip
    print("top votes | queries | plurality right | true classes " + " ".join(map(str, range(k))))
    print("---|---|---|---")
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        inside = (top >= lo) & (top < hi)
        if not inside.any():
            continue
        counts = " ".join(str(c) for c in np.bincount(truth[inside], minlength=k))
        upper = f"{hi:.0f})" if hi <= teachers else f"{teachers}]"
        print(f"[{lo:.0f}, {upper} | {inside.sum()} | "
              f"{right[inside].mean():.1%} | {counts}")  # fmt: skip


if __name__ == "__main__":
    main()
