"""Benchmark: FixMatch teachers trained all at once (stacked, vmap) against a Python loop
over the same teachers, in one process.

Both train ``--teachers`` copies of the tanh CNN on Fashion-MNIST-shaped images, each
teacher on its own 160 labels plus unlabeled images, for the same number of FixMatch
steps (labeled batch ``--batch``, μ = ``--mu``, weak crop + strong RandAugment/Cutout).
Vectorized: :func:`labeldp.train.ensemble.train_fixmatch_ensemble` on all teachers (its
forward as ``--forward``: auto is vmap on CUDA, a per-model loop on CPU; sampling,
augmentation, optimizer and EMA are batched over the teachers either way). Loop: for
each teacher, the training core (:class:`labeldp.train.Trainer`) with
:class:`labeldp.train.fixmatch.FixMatchStep` — what one writes without the ensemble.
Rounds alternate (vectorized first, then loop first); the report gives teacher-steps per
second, medians, and the ratio vectorized ÷ loop (> 1: the ensemble is faster).

    python experiments/perf/teachers_vectorized_vs_loop.py --teachers 50 --batch 16
writes results/perf/teachers_vectorized_vs_loop-b<batch>-t<threads>-<device>.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from benchmark_record import write_benchmark  # the sibling module in experiments/perf

from labeldp.augment import Normalize, WeakAugment
from labeldp.models import build_model
from labeldp.strong_augment import StrongAugment
from labeldp.train import HardLabels, TrainConfig, Trainer, resolve_device
from labeldp.train.ensemble import EnsembleFixMatchConfig, StackedModels, train_fixmatch_ensemble
from labeldp.train.fixmatch import FixMatchStep

LABELS_PER_TEACHER = 160
NORMALIZE = Normalize((0.286,), (0.353,))
WEAK = WeakAugment(crop_padding=2, hflip=True)
STRONG = StrongAugment()


def teachers(n: int, device: torch.device) -> list[torch.nn.Module]:
    out = []
    for i in range(n):
        torch.manual_seed(i)
        model = build_model("cnn-tanh", num_classes=10, in_channels=1, image_size=28)
        out.append(model.to(device))
    return out


def vectorized(images, labels, parts, epochs, device, batch, mu, forward) -> float:
    config = EnsembleFixMatchConfig(
        steps=epochs * LABELS_PER_TEACHER // batch, batch_size=batch, mu=mu, lr=0.03
    )
    stacked = StackedModels(teachers(len(parts), device), forward=forward)
    start = time.perf_counter()
    train_fixmatch_ensemble(
        stacked, images, labels, parts, config, normalize=NORMALIZE, weak=WEAK,
        strong=STRONG, progress=False,
    )  # fmt: skip
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def loop(images, labels, parts, epochs, device, batch, mu, forward) -> float:
    start = time.perf_counter()
    for i, model in enumerate(teachers(len(parts), device)):
        step = FixMatchStep(images, NORMALIZE, WEAK, STRONG, mu=mu, seed=i)
        Trainer(
            model, images[parts[i]], HardLabels(labels[parts[i]]),
            TrainConfig(epochs=epochs, batch_size=batch, lr=0.03, schedule="cosine",
                        warmup_fraction=0.0, ema_decay=0.999, seed=i),
            normalize=NORMALIZE, augment=WEAK, step=step, progress=False,
        ).fit()  # fmt: skip
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teachers", type=int, default=50)
    parser.add_argument("--epochs", type=int, default=2, help="passes over each teacher's labels")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16, help="labeled images per teacher-step")
    parser.add_argument("--mu", type=int, default=7, help="unlabeled per labeled image")
    parser.add_argument("--forward", choices=["auto", "vmap", "loop"], default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out-dir", default="results/perf")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    n_images = 20_000
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n_images, 1, 28, 28), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 10, (n_images,), generator=g)
    images, labels = images.to(device), labels.to(device)
    parts = [
        torch.arange(i * LABELS_PER_TEACHER, (i + 1) * LABELS_PER_TEACHER, device=device)
        for i in range(args.teachers)
    ]
    steps = args.epochs * LABELS_PER_TEACHER // args.batch
    shape = (args.batch, args.mu, args.forward)
    vectorized(images, labels, parts[:2], 1, device, *shape)  # warm-up
    loop(images, labels, parts[:2], 1, device, *shape)
    contenders = {"vectorized": vectorized, "loop": loop}
    seconds: dict[str, list[float]] = {k: [] for k in contenders}
    for r in range(args.rounds):
        order = list(contenders) if r % 2 == 0 else list(reversed(contenders))
        for name in order:
            seconds[name].append(
                contenders[name](images, labels, parts, args.epochs, device, *shape)
            )
            print(f"round {r + 1} {name}: {seconds[name][-1]:.1f} s", file=sys.stderr)
    median = {k: statistics.median(v) for k, v in seconds.items()}
    throughput = {k: args.teachers * steps / v for k, v in median.items()}
    ratio = throughput["vectorized"] / throughput["loop"]
    write_benchmark(
        f"teachers_vectorized_vs_loop-b{args.batch}-t{torch.get_num_threads()}",
        "FixMatch teachers: vectorized vs Python loop",
        device,
        {
            "teachers": args.teachers,
            "batch": args.batch,
            "mu": args.mu,
            "forward": args.forward,
            "threads": torch.get_num_threads(),
            "steps_per_teacher": steps,
            "seconds": seconds,
            "teacher_steps_per_second": throughput,
            "vectorized_over_loop": ratio,
        },
        [
            f"- {args.teachers} tanh-CNN teachers, {LABELS_PER_TEACHER} labels each, {steps} "
            f"FixMatch steps each (labeled batch {args.batch}, μ = {args.mu}: "
            f"{args.batch * (1 + 2 * args.mu)} images per teacher-step), {args.rounds} "
            f"alternating rounds, medians; ensemble forward {args.forward}; "
            f"{torch.get_num_threads()} torch threads"
        ],
        [
            "| training | median s | teacher-steps / s |",
            "|---|---|---|",
            *(f"| {k} | {median[k]:.1f} | {throughput[k]:.2f} |" for k in contenders),
            "",
            f"vectorized ÷ loop throughput: **{ratio:.2f}×**",
        ],
        argv,
        args.out_dir,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
