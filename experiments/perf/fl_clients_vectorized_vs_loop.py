"""Benchmark: the client trips of one server version trained together (stacked models)
against a Python loop over the same clients, in one process.

Every trip of a server version starts from the same weights. Vectorized:
:func:`labeldp.fl.clients.train_trips` trains the n trips as n stacked models
(:class:`~labeldp.train.ensemble.StackedModels`), once with each forward strategy
(``vmap``: one vmap'd call, convolutions become grouped ones; ``grouped``: the stack as one
model with grouped layers, channels-last, :mod:`labeldp.train.grouped_forward`; ``loop``:
model by model on views of the stacked parameters, everything else batched; the
simulator's ``forward="auto"`` takes ``grouped`` on CPU for cnn-tanh, ``vmap`` on CUDA). Loop:
:func:`labeldp.fl.clients.train_trips_loop`, one ``nn.Module`` and optimizer per client
(the tests' reference), given the model as built (contiguous weights) and, as a stronger
peer, converted to channels-last (the layout the training core and the stack's loop
forward use; PyTorch's stride-1 max-pool is much faster on it). Reference, not a
contender: one module with shared weights trained on all the stacked clients' images of a
step as one batch (same images, same step count): what no vectorization over distinct
client weights can beat, so ideal ÷ loop bounds the attainable ratio.

A federation-like setting: ``--clients`` trips per version (n = 1 is FedAsync, K = 1:
nothing to batch across clients), each client holding a lognormal number of examples
(:func:`labeldp.fl.population.client_sizes`: ``--min-size`` plus a share, mean
``--mean-size``) of Fashion-MNIST (or synthetic uint8 images of its shape with
``--data synthetic``), ``--epochs`` local epoch(s) of SGD at batch ``--batch``, lr
``--lr``, the ``cnn-tanh`` model (norm="group"; the tanh CNN has no norm layer). Rounds
rotate the contenders' order; the report gives medians, trips per second, the ratios
vectorized ÷ loop (> 1: the stack is faster) and the largest differences between the
stacked and the looped updates.

    python experiments/perf/fl_clients_vectorized_vs_loop.py --clients 1 10 100 300
writes results/perf/fl_clients_vectorized_vs_loop-t<threads>-<device>.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from benchmark_record import write_benchmark  # the sibling module in experiments/perf

from labeldp.augment import Normalize
from labeldp.data import load_splits
from labeldp.data.sources import get_info
from labeldp.fl.clients import LocalTraining, train_trips, train_trips_loop, trip_batches
from labeldp.fl.population import client_sizes, iid
from labeldp.models import build_model
from labeldp.train import HardLabels, resolve_device

LOOPS = ("loop", "loop-channels-last")
VECTORIZED = ("vectorized-loop-forward", "vectorized-vmap-forward", "vectorized-grouped-forward")
CONTENDERS = (*LOOPS, *VECTORIZED, "ideal")
LABEL = {
    "loop": "loop (`train_trips_loop`)",
    "loop-channels-last": "loop, channels-last module",
    "vectorized-loop-forward": "vectorized, loop forward",
    "vectorized-vmap-forward": "vectorized, vmap forward",
    "vectorized-grouped-forward": "vectorized, grouped forward (CPU auto for cnn-tanh at n > 1)",
    "ideal": "ideal: shared weights, one batch",
}


def images_and_labels(data: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    if data == "fashion-mnist":
        train, _ = load_splits("fashion-mnist", download=False, device=device)
        return train.images, train.labels
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (60_000, 1, 28, 28), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 10, (60_000,), generator=g)
    return images.to(device), labels.to(device)


def clients(n: int, num_examples: int, mean_size: int, min_size: int, seed: int, device):
    """n clients' example indices: lognormal sizes (≥ min_size, mean mean_size), IID."""
    sizes = client_sizes("lognormal", n, n * mean_size, seed, min_size=min_size, sigma=0.5)
    population = iid(num_examples, n, seed, sizes=sizes)
    return [torch.tensor(population.client(i), device=device) for i in range(n)], sizes


def generators(n: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(i) for i in range(n)]


def ideal_batches(examples, local: LocalTraining, device) -> list[torch.Tensor]:
    """Per local step, the dataset indices of every client still training at that step
    (the same batches as the trips draw), as one batch."""
    gens = generators(len(examples))
    trips = [trip_batches(len(e), local, g) for e, g in zip(examples, gens, strict=True)]
    steps = max(len(t) for t in trips)
    return [
        torch.cat([e[t[s]] for e, t in zip(examples, trips, strict=True) if len(t) > s]).to(device)
        for s in range(steps)
    ]


def run(name, models, start, images, targets, examples, local, normalize, ideal, device):
    """One contender on all trips: (seconds, updates or None)."""
    began = time.perf_counter()
    out = None
    if name == "ideal":
        model = models["channels-last"]
        with torch.no_grad():
            for k, p in model.named_parameters():
                p.copy_(start[k])
        optimizer = torch.optim.SGD(model.parameters(), lr=local.lr)
        for idx in ideal:
            optimizer.zero_grad()
            F.cross_entropy(model(normalize(images[idx])), targets(idx, None)).backward()
            optimizer.step()
    else:
        model = models["channels-last" if name == "loop-channels-last" else "contiguous"]
        args = (model, start, images, targets, examples, generators(len(examples)), local)
        if name in LOOPS:
            out = train_trips_loop(*args, normalize)
        else:
            forward = name.removeprefix("vectorized-").removesuffix("-forward")
            out = train_trips(*args, normalize, forward=forward)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - began, out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 10, 100, 300])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--mean-size", type=int, default=40, help="mean examples per client")
    parser.add_argument("--min-size", type=int, default=20, help="fewest examples per client")
    parser.add_argument("--batch", type=int, default=10, help="local batch B")
    parser.add_argument("--epochs", type=int, default=1, help="local epochs")
    parser.add_argument("--lr", type=float, default=0.05, help="local learning rate")
    parser.add_argument("--data", choices=["fashion-mnist", "synthetic"], default="fashion-mnist")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument(
        "--settle", type=float, default=3.0,
        help="seconds to wait before measuring (on a shared machine a governor may pause "
        "other jobs while a benchmark runs)",
    )  # fmt: skip
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out-dir", default="results/perf")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    info = get_info("fashion-mnist")
    normalize = Normalize(info.mean, info.std)
    images, labels = images_and_labels(args.data, device)
    targets = HardLabels(labels)
    local = LocalTraining(lr=args.lr, batch_size=args.batch, epochs=args.epochs)
    torch.manual_seed(0)
    model = build_model("cnn-tanh", num_classes=10, in_channels=1, image_size=28, norm="group")
    model = model.to(device)
    start = {k: v.detach().clone() for k, v in model.named_parameters()}
    models = {
        "contiguous": model,
        "channels-last": build_model(
            "cnn-tanh", num_classes=10, in_channels=1, image_size=28, norm="group"
        ).to(device, memory_format=torch.channels_last),
    }
    common = (models, start, images, targets)
    time.sleep(args.settle)
    load_before = os.getloadavg()

    warm, _ = clients(4, len(labels), args.mean_size, args.min_size, 99, device)
    for name in CONTENDERS:  # warm-up
        run(name, *common, warm, local, normalize, ideal_batches(warm, local, device), device)

    per_n: dict[str, dict] = {}
    for n in args.clients:
        examples, sizes = clients(n, len(labels), args.mean_size, args.min_size, n, device)
        ideal = ideal_batches(examples, local, device)
        steps = [local.num_steps(int(s)) for s in sizes]
        seconds: dict[str, list[float]] = {k: [] for k in CONTENDERS}
        diff: dict[str, dict[str, float]] = {}
        largest_update = 0.0
        for r in range(args.rounds):
            shift = r % len(CONTENDERS)
            order = CONTENDERS[shift:] + CONTENDERS[:shift]
            if r % 2:
                order = order[::-1]
            outs = {}
            for name in order:
                s, outs[name] = run(name, *common, examples, local, normalize, ideal, device)
                seconds[name].append(s)
                print(f"n={n} round {r + 1} {name}: {s:.3f} s", file=sys.stderr)
            if r == 0:
                largest_update = float(outs["loop"].abs().max())
                for name in (*VECTORIZED, "loop-channels-last"):
                    d = (outs[name] - outs["loop"]).abs().amax(1)
                    diff[name] = {
                        "max_abs": float(d.max()),
                        "clients_above_1e-5": int((d > 1e-5).sum()),
                    }
        median = {k: statistics.median(v) for k, v in seconds.items()}
        per_n[str(n)] = {
            "clients": n,
            "sizes": {
                "min": int(sizes.min()),
                "median": float(np.median(sizes)),
                "max": int(sizes.max()),
                "mean": float(sizes.mean()),
            },  # fmt: skip
            "local_steps": {"total": int(sum(steps)), "min": min(steps), "max": max(steps)},
            "seconds": seconds,
            "median_seconds": median,
            "trips_per_second": {k: n / v for k, v in median.items()},
            "ms_per_trip": {k: 1000 * v / n for k, v in median.items()},
            "ms_per_client_step": {k: 1000 * v / sum(steps) for k, v in median.items()},
            "over_loop": {k: median["loop"] / v for k, v in median.items()},
            "over_loop_channels_last": {
                k: median["loop-channels-last"] / v for k, v in median.items()
            },
            "fastest_round_over_loop": {
                k: min(seconds["loop"]) / min(v) for k, v in seconds.items()
            },
            "diff_vs_loop": diff,
            "max_abs_update": largest_update,
        }
    load_after = os.getloadavg()

    ratioed = (*VECTORIZED, "ideal")
    short = {k: k.removeprefix("vectorized-").replace("-forward", "-fwd") for k in ratioed}

    def row(n: str, m: dict) -> str:
        tps, a, b = m["trips_per_second"], m["over_loop"], m["over_loop_channels_last"]
        return (
            f"| {n} | {m['local_steps']['total']} | "
            + " | ".join(f"{tps[k]:.1f}" for k in CONTENDERS)
            + "".join(f" | **{a[k]:.2f}×** / {b[k]:.2f}×" for k in ratioed)
            + " |"
        )

    def diff_row(n: str, m: dict) -> str:
        d = m["diff_vs_loop"]
        return (
            f"| {n} | {m['max_abs_update']:.3f} | "
            + " | ".join(
                f"{d[k]['max_abs']:.1e} ({d[k]['clients_above_1e-5']})"
                for k in (*VECTORIZED, "loop-channels-last")
            )
            + " |"
        )

    threads = torch.get_num_threads()
    write_benchmark(
        f"fl_clients_vectorized_vs_loop-t{threads}",
        "Federated client trips: vectorized (stacked models) vs per-client loop",
        device,
        {
            "data": args.data,
            "model": "cnn-tanh (norm=group)",
            "local": {"lr": args.lr, "batch_size": args.batch, "epochs": args.epochs},
            "mean_size": args.mean_size,
            "min_size": args.min_size,
            "rounds": args.rounds,
            "threads": threads,
            "load_average_before_after": [load_before, load_after],
            "by_clients": per_n,
        },
        [
            f"- {args.data} images; clients with lognormal sizes (σ = 0.5, ≥ {args.min_size}, "
            f"mean {args.mean_size} examples), {args.epochs} local epoch(s) of SGD at "
            f"B = {args.batch}, lr {args.lr}; cnn-tanh (norm=group: it has no norm layer); "
            f"all trips of a row start from the same weights (one server version); "
            f"{args.rounds} rotating rounds, medians; {threads} torch threads; load average "
            f"(1 min) {load_before[0]:.2f} before, {load_after[0]:.2f} after",
            "- loop: `train_trips_loop` (one module + optimizer per client), as built and with "
            "a channels-last module; vectorized: `train_trips` with StackedModels forward "
            '`loop`, `vmap` or `grouped` (what `forward="auto"` takes on CPU for cnn-tanh); '
            "ideal: one module, shared weights, each step's images of all clients as one "
            "batch (a bound, not the same computation)",
        ],
        [
            "| trips / version | local steps | "
            + " | ".join(f"{LABEL[k]} trips/s" for k in CONTENDERS)
            + "".join(f" | {short[k]} ÷ loop / ÷ loop-cl" for k in ratioed)
            + " |",
            "|" + "---|" * (len(CONTENDERS) + len(ratioed) + 2),
            *(row(n, m) for n, m in per_n.items()),
            "",
            "The same ratios ÷ loop from each contender's fastest round (robust to other jobs "
            "slowing some rounds): "
            + "; ".join(
                f"n = {n}: "
                + ", ".join(f"{short[k]} {m['fastest_round_over_loop'][k]:.2f}×" for k in ratioed)
                for n, m in per_n.items()
            ),
            "",
            "Time per trip (ms, median):",
            "",
            "| trips / version | " + " | ".join(LABEL[k] for k in CONTENDERS) + " |",
            "|" + "---|" * (len(CONTENDERS) + 1),
            *(
                f"| {n} | " + " | ".join(f"{m['ms_per_trip'][k]:.1f}" for k in CONTENDERS) + " |"
                for n, m in per_n.items()
            ),
            "",
            "Same updates? Largest |Δ − Δ_loop| over all parameters and clients (clients "
            "differing by more than 1e-5):",
            "",
            "| trips / version | max abs Δ | "
            + " | ".join(LABEL[k] for k in (*VECTORIZED, "loop-channels-last"))
            + " |",
            "|" + "---|" * (len(VECTORIZED) + 3),
            *(diff_row(n, m) for n, m in per_n.items()),
        ],
        argv,
        args.out_dir,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
