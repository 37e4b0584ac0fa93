"""Benchmark: one training epoch with labeldp's core loop against a plain PyTorch
DataLoader loop over the same data, same model, same optimizer, in one process.

The peer is what a user writes without the core: a ``Dataset`` whose ``__getitem__``
augments one example (reflect-padded random crop, horizontal flip) and normalizes it,
a ``DataLoader`` (shuffle, batch 128) that collates, and the usual
forward/backward/step. Two peers are timed: as written (contiguous NCHW) and with the
same channels-last memory format the core uses, so the report separates the gain of the
batched on-device data path from the gain of the memory format.

Runs alternate (core, peer, peer-channels-last, then the next round in rotated order) so
drift of the machine hits all alike; the report gives medians and the ratios
peer time ÷ core time (> 1 means the core is faster).

    python experiments/perf/train_core_vs_dataloader.py --repeats 3
writes results/perf/train_core_vs_dataloader-<device>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from benchmark_record import write_benchmark  # the sibling module in experiments/perf
from torch.utils.data import DataLoader, Dataset

from labeldp.augment import Normalize, WeakAugment
from labeldp.data import load_splits
from labeldp.models import build_model
from labeldp.train import HardLabels, TrainConfig, Trainer, resolve_device

BATCH, LR, PADDING = 128, 0.05, 2


class PerExampleAugmented(Dataset):
    """The peer's data path: one example at a time, as torchvision transforms would."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: float, std: float) -> None:
        self.images, self.labels, self.mean, self.std = images, labels, mean, std

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        x = self.images[i].float().div(255)
        x = F.pad(x[None], (PADDING,) * 4, mode="reflect")[0]
        dy, dx = torch.randint(0, 2 * PADDING + 1, (2,)).tolist()
        x = x[:, dy : dy + x.shape[1] - 2 * PADDING, dx : dx + x.shape[2] - 2 * PADDING]
        if torch.rand(()) < 0.5:
            x = x.flip(-1)
        return (x - self.mean) / self.std, self.labels[i]


def new_model(device: torch.device, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("cnn", num_classes=10, in_channels=1, image_size=28).to(device)


def core_epoch(images, labels, device, info) -> float:
    trainer = Trainer(
        new_model(device),
        images,
        HardLabels(labels),
        TrainConfig(epochs=1, batch_size=BATCH, lr=LR, schedule="constant"),
        normalize=Normalize(info.mean, info.std),
        augment=WeakAugment(crop_padding=PADDING, hflip=True),
        progress=False,
    )
    start = time.perf_counter()
    trainer.fit()
    return time.perf_counter() - start


def peer_epoch(images, labels, device, info, channels_last: bool) -> float:
    model = new_model(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=LR, momentum=0.9, nesterov=True, weight_decay=5e-4
    )
    loader = DataLoader(
        PerExampleAugmented(images.cpu(), labels.cpu(), info.mean[0], info.std[0]),
        batch_size=BATCH,
        shuffle=True,
        num_workers=0,
        pin_memory=device.type == "cuda",
    )
    model.train()
    start = time.perf_counter()
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="rounds of (core, peers)")
    parser.add_argument(
        "--train-size", type=int, default=None, help="examples per epoch (default all)"
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out-dir", default="results/perf")
    args = parser.parse_args(argv)

    device = resolve_device(args.device)
    train, _ = load_splits("fashion-mnist", data_dir=args.data_dir, device=device)
    n = args.train_size or len(train)
    images, labels = train.images[:n], train.labels[:n]
    contenders = {
        "core": lambda: core_epoch(images, labels, device, train.info),
        "dataloader": lambda: peer_epoch(images, labels, device, train.info, channels_last=False),
        "dataloader_channels_last": lambda: peer_epoch(
            images, labels, device, train.info, channels_last=True
        ),
    }
    # One untimed warm-up of each (allocator, kernels, cuDNN autotuning).
    warm = images[: BATCH * 4], labels[: BATCH * 4]
    core_epoch(*warm, device, train.info)
    peer_epoch(*warm, device, train.info, channels_last=False)
    peer_epoch(*warm, device, train.info, channels_last=True)

    names = list(contenders)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(args.repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            seconds = contenders[name]()
            times[name].append(seconds)
            print(
                f"round {r + 1}/{args.repeats} {name}: {seconds:.2f} s", file=sys.stderr, flush=True
            )

    median = {name: statistics.median(t) for name, t in times.items()}
    ratios = {name: median[name] / median["core"] for name in names if name != "core"}
    write_benchmark(
        "train_core_vs_dataloader",
        "Training core vs plain DataLoader loop",
        device,
        {
            "examples_per_epoch": n,
            "batch_size": BATCH,
            "model": "cnn",
            "seconds": times,
            "median_seconds": median,
            "peer_over_core": ratios,
        },
        [
            f"- one epoch of {n} Fashion-MNIST examples, small CNN, batch {BATCH}, "
            f"crop+flip augmentation, {args.repeats} alternating rounds, medians"
        ],
        [
            "| loop | median s / epoch | ÷ core |",
            "|---|---|---|",
            *(
                f"| {name} | {median[name]:.2f} | {median[name] / median['core']:.2f} |"
                for name in names
            ),
        ],
        argv,
        args.out_dir,
    )
    print(json.dumps({"median_seconds": median, "peer_over_core": ratios}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
