"""Benchmark: a LabelDP-Pro step against a DP-SGD step, same model and batch, in one
process.

For each model (``--models``), a batch of ``--batch`` Fashion-MNIST-shaped images (random
pixels: the time does not depend on the values) and random labels: DP-SGD's step
(:class:`labeldp.train.dpsgd.DPSGDStep`: per-example gradients, clipping, noise) and
LabelDP-Pro's (:class:`labeldp.train.labeldp_pro.LabelDPProStep`: the same step, then the
class gradients of ``--projection-batch`` examples and ``--projection-steps`` iterations of
the projection) alternate for ``--rounds`` rounds after a warm-up; the report gives each
one's median seconds per step and their ratio.

    python experiments/perf/labeldp_pro_vs_dpsgd.py
writes results/perf/labeldp_pro_vs_dpsgd-cpu.{json,md} (or -cuda on a GPU).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
from benchmark_record import write_benchmark  # the sibling module in experiments/perf

from labeldp.models import build_model
from labeldp.train.dpsgd import DPSGDStep
from labeldp.train.labeldp_pro import LabelDPProStep, ProjectionBatches
from labeldp.train.targets import HardLabels


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="cnn-tiny,cnn-tanh")
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--projection-batch", type=int, default=64)
    parser.add_argument("--projection-steps", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out-dir", default="results/perf")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(args.batch, 1, 28, 28, generator=generator).to(device)
    labels = torch.randint(0, 10, (args.batch,), generator=generator).to(device)
    pool = torch.rand(5000, 1, 28, 28, generator=generator).to(device)
    indices = torch.arange(args.batch, device=device)
    results = {}
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = build_model(name, num_classes=10, in_channels=1, image_size=28, norm="group")
        model = model.to(device)

        def dpsgd() -> DPSGDStep:
            return DPSGDStep(1.0, 1.0, args.batch, physical_batch_size=args.batch, seed=0)

        steps = {
            "dp-sgd": dpsgd(),
            "labeldp-pro": LabelDPProStep(
                dpsgd(),
                ProjectionBatches(len(pool), args.projection_batch, lambda i: pool[i], seed=0,
                                  device=device),  # fmt: skip
                num_classes=10,
                projection_steps=args.projection_steps,
            ),
        }
        times: dict[str, list[float]] = {k: [] for k in steps}
        for round_ in range(args.rounds + 1):
            for key, step in steps.items():
                _sync(device)
                began = time.perf_counter()
                step(model, images, indices, HardLabels(labels), contextlib.nullcontext)
                _sync(device)
                if round_ > 0:  # the first round warms up
                    times[key].append(time.perf_counter() - began)
        medians = {k: statistics.median(v) for k, v in times.items()}
        results[name] = {
            "seconds": medians,
            "ratio": medians["labeldp-pro"] / medians["dp-sgd"],
            "parameters": sum(p.numel() for p in model.parameters()),
        }
        print(name, results[name])
    table = [
        "| model | parameters | dp-sgd s/step | labeldp-pro s/step | labeldp-pro ÷ dp-sgd |",
        "|---|---|---|---|---|",
        *(
            f"| {n} | {r['parameters']:,} | {r['seconds']['dp-sgd']:.3f} | "
            f"{r['seconds']['labeldp-pro']:.3f} | {r['ratio']:.2f}× |"
            for n, r in results.items()
        ),
    ]
    setup = [
        f"- batch {args.batch} (the private step's per-example gradients, clipping and noise), "
        f"projection batch {args.projection_batch} × 10 classes, {args.projection_steps} "
        f"projection iterations; median of {args.rounds} alternating rounds after a warm-up",
        f"- torch threads: {torch.get_num_threads()}",
    ]
    write_benchmark(
        "labeldp_pro_vs_dpsgd", "A LabelDP-Pro step against a DP-SGD step", device,
        {"results": results, "batch": args.batch, "projection_batch": args.projection_batch,
         "projection_steps": args.projection_steps, "rounds": args.rounds},
        setup, table, argv, args.out_dir,
    )  # fmt: skip


if __name__ == "__main__":
    main()
