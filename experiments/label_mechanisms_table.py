"""Fashion-MNIST test accuracy of the label-DP methods across ε, one table; with
--canaries / --audit-canaries, the attacks' ε_LB next to each ε.

Every run uses the same model (small CNN) and the same training budget: the same epochs,
batch size and schedule for every model trained (LP-MST trains one model per stage, each
for that many epochs on the labels it has). Runs are recorded in run folders under
--runs-dir and skipped when already finished, so an interrupted table resumes.

    python experiments/label_mechanisms_table.py --epsilons 0.5 1 2 4 --epochs 8
writes results/fashion_mnist_label_mechanisms.md (and .json) with its provenance;

    python experiments/label_mechanisms_table.py --methods rr alibi --epsilons 1 2 4 \
        --canaries 1000 --audit-canaries 1000 --runs-dir runs/audits \
        --out results/fashion_mnist_audits.md
adds the memorization and one-run ε_LB of every run.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
from pathlib import Path

from attacks.harness import attack_run
from labeldp.io import atomic_write_json, atomic_write_text
from labeldp.provenance import provenance
from labeldp.runner import Environment, RunConfig, train_run
from labeldp.train import TrainConfig


def steps(metrics: dict, batch_size: int, epochs: int) -> int:
    """Optimizer steps the run took over all its models."""
    sizes = metrics["method_details"].get("stage_training_sizes", [metrics["train_size"]])
    return sum(math.ceil(size / batch_size) * epochs for size in sizes)


def _lb(part: dict | None) -> str:
    if part is None:
        return "–"
    value = part["epsilon_lb"]
    text = "∞" if value == "inf" else f"{value:.2f}"
    return f"{text} ({part['correct']}/{part['guesses']})"


def audit_lines(rows: list[dict], args: argparse.Namespace) -> list[str]:
    """The attacks' table: claimed ε, ε_LB of both audits (right/guesses), label inference."""
    lines = [
        "",
        f"## What the runs leak: {args.canaries} memorization canaries, "
        f"{args.audit_canaries} audit canaries, α = 0.05",
        "",
        "ε_LB (right guesses / guesses). Memorization: threshold chosen on half the canaries, "
        "bound on the other half; one-run: Bonferroni over 5 guess counts. Label inference: "
        "argmax accuracy on training labels minus on held-out labels.",
        "",
        "| method | ε | test acc (%) | ε_LB memorization | ε_LB one-run | label-inference gap |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        a = r["attack"]
        eps = "∞" if r["epsilon"] is None else f"{r['epsilon']:g}"
        lines.append(
            f"| {r['method']} | {eps} | {100 * r['test_accuracy']:.2f} | "
            f"{_lb(a['memorization'])} | {_lb(a['one_run'])} | "
            f"{a['label_inference']['gap']:+.4f} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=["rr", "lp-2st", "alibi"])
    parser.add_argument("--epsilons", nargs="+", type=float, default=[0.5, 1.0, 2.0, 4.0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--canaries", type=int, default=0)
    parser.add_argument("--audit-canaries", type=int, default=0)
    parser.add_argument("--train-size", type=int, default=None)
    parser.add_argument("--crop-padding", type=int, default=None)
    parser.add_argument("--runs-dir", default="runs/label-mechanisms")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default="results/fashion_mnist_label_mechanisms.md")
    args = parser.parse_args(argv)

    env = Environment(data_dir=args.data_dir, progress=False)
    train = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, seed=args.seed)
    grid = [("none", None)] + [(m, e) for m in args.methods for e in args.epsilons]
    rows = []
    for i, (method, eps) in enumerate(grid, 1):
        options = {} if eps is None else {"epsilon": eps}
        name = method if eps is None else f"{method}-eps{eps:g}"
        config = RunConfig(
            dataset="fashion-mnist",
            train=train,
            method=method,
            method_options=options,
            train_size=args.train_size,
            crop_padding=args.crop_padding,
            canaries=args.canaries,
            audit_canaries=args.audit_canaries,
        )
        run_dir = Path(args.runs_dir) / f"{name}-seed{args.seed}"
        metrics = train_run(config, run_dir, env, resume=True)
        row = {
            "method": method,
            "epsilon": eps,
            "test_accuracy": metrics["test_accuracy"],
            "steps": steps(metrics, args.batch_size, args.epochs),
            "train_seconds": metrics["train_seconds"],
            "git_commit": metrics["git_commit"],
        }
        if args.canaries or args.audit_canaries:
            attack = attack_run(run_dir)
            row["attack"] = {k: attack[k] for k in ("memorization", "one_run", "label_inference")}
        rows.append(row)
        print(
            f"[{i}/{len(grid)}] {name}: {metrics['test_accuracy']:.4f}", file=sys.stderr, flush=True
        )

    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])])
    record = {"command": command, "rows": rows, **provenance()}
    out = Path(args.out)
    atomic_write_json(out.with_suffix(".json"), record)
    header = "| method | " + " | ".join(f"ε={e:g}" for e in args.epsilons) + " | optimizer steps |"
    lines = [
        "# Fashion-MNIST: label-DP methods across ε",
        "",
        f"- command: `{command}`",
        f"- commit: {record['git_commit']}{' (dirty)' if record['git_dirty'] else ''}; "
        f"runs made at commits: {', '.join(sorted({r['git_commit'] or '?' for r in rows}))}",
        f"- machine: {record['machine']}",
        f"- date: {record['date']}",
        f"- small CNN, {args.epochs} epochs per trained model, batch {args.batch_size}, "
        f"one-cycle lr 0.1, seed {args.seed}; test accuracy (%) on the 10,000 test images",
        "",
        header,
        "|---" * (len(args.epsilons) + 2) + "|",
    ]
    none = next(r for r in rows if r["method"] == "none")
    for method in args.methods:
        cells = [
            next(r for r in rows if r["method"] == method and r["epsilon"] == e)
            for e in args.epsilons
        ]
        step_counts = sorted({c["steps"] for c in cells})
        lines.append(
            f"| {method} | "
            + " | ".join(f"{100 * c['test_accuracy']:.2f}" for c in cells)
            + f" | {'/'.join(map(str, step_counts))} |"
        )
    lines.append(
        f"| none (ε = ∞) | {100 * none['test_accuracy']:.2f} (all ε) |" + " |" * len(args.epsilons)
    )
    if args.canaries or args.audit_canaries:
        lines += audit_lines(rows, args)
    atomic_write_text(out, "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
