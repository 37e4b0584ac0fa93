"""Benchmark: one DP-SGD step with labeldp's DPSGDStep against Opacus, in one process.

Both compute per-example gradients of the same model on the same batch, clip them to
C = 1, add Gaussian noise (σ = 1) to the sum, divide by the batch size and take an SGD
step. Ours: ``labeldp.train.dpsgd.DPSGDStep`` (torch.func vmap over grad) + SGD. Opacus:
``GradSampleModule`` (hooks mode) + ``DPOptimizer``, its standard path. Models: the
Fashion-MNIST CNN (batch 256) and a larger one, ResNet-18 with GroupNorm on 32×32×3
inputs (batch 64 on CPU). The batch is fixed (not Poisson) so both do identical work;
ours processes it as one physical batch.

Step time: rounds alternate (ours, opacus, then opacus, ours, ...) so drift of the
machine hits both alike; medians over ``--steps`` timed steps per round after warm-up.

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` over one step, minus what was
allocated before it. On CPU there is no allocator counter, so the peak resident set is
read from the kernel: /proc/self/clear_refs resets VmHWM, one step runs, and the peak is
VmHWM minus the resident size before the step. glibc would otherwise keep freed blocks
and hide re-use, so the script re-executes itself with MALLOC_MMAP_THRESHOLD_=65536
(every tensor above 64 KiB is mapped and unmapped on its own).

    python experiments/perf/dpsgd_vs_opacus.py
writes results/perf/dpsgd_vs_opacus-<device>.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from benchmark_record import write_benchmark  # the sibling module in experiments/perf

from labeldp.models import build_model
from labeldp.train import HardLabels, resolve_device
from labeldp.train.dpsgd import DPSGDStep

C, SIGMA, LR = 1.0, 1.0, 0.1
MMAP_ENV = "MALLOC_MMAP_THRESHOLD_"


def cases(device: torch.device) -> dict[str, dict]:
    larger_batch = 256 if device.type == "cuda" else 64
    return {
        "cnn-fmnist": {"model": "cnn", "shape": (1, 28, 28), "batch": 256},
        "resnet18-gn-cifar": {"model": "resnet18", "shape": (3, 32, 32), "batch": larger_batch},
    }


def new_model(case: dict, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    c, h, _ = case["shape"]
    model = build_model(case["model"], num_classes=10, in_channels=c, image_size=h, norm="group")
    return model.to(device, memory_format=torch.channels_last)


def ours(case: dict, device: torch.device):
    model = new_model(case, device)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    step = DPSGDStep(C, SIGMA, expected_batch_size=case["batch"], physical_batch_size=case["batch"])
    from contextlib import nullcontext

    def run(x: torch.Tensor, y: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        indices = torch.arange(len(y), device=device)
        step(model, x, indices, HardLabels(y), nullcontext)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return run


def opacus(case: dict, device: torch.device):
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    model = GradSampleModule(new_model(case, device))
    optimizer = DPOptimizer(
        torch.optim.SGD(model.parameters(), lr=LR),
        noise_multiplier=SIGMA,
        max_grad_norm=C,
        expected_batch_size=case["batch"],
    )

    def run(x: torch.Tensor, y: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)  # frees the grad samples before the next step

    return run


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_bytes(run, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> int:
    """Extra memory at the peak of one step (see the module docstring)."""
    if device.type == "cuda":
        synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        run(x, y)
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    run(x, y)
    return (_status_kib("VmHWM") - before) * 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out-dir", default="results/perf")
    parser.add_argument("--cases", default=None, help="comma-separated case names (default all)")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    if device.type == "cpu" and os.environ.get(MMAP_ENV) != "65536":
        env = {**os.environ, MMAP_ENV: "65536"}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)

    results: dict[str, dict] = {}
    selected = cases(device)
    if args.cases:
        selected = {k: v for k, v in selected.items() if k in args.cases.split(",")}
    for name, case in selected.items():
        torch.manual_seed(1)
        x = torch.randn(case["batch"], *case["shape"], device=device).contiguous(
            memory_format=torch.channels_last
        )
        y = torch.randint(0, 10, (case["batch"],), device=device)
        runners = {"ours": ours(case, device), "opacus": opacus(case, device)}
        for run in runners.values():  # warm-up
            run(x, y)
            run(x, y)
        memory = {k: peak_bytes(run, x, y, device) for k, run in runners.items()}
        times: dict[str, list[float]] = {k: [] for k in runners}
        for r in range(args.rounds):
            order = list(runners) if r % 2 == 0 else list(reversed(runners))
            for k in order:
                synchronize(device)
                start = time.perf_counter()
                for _ in range(args.steps):
                    runners[k](x, y)
                synchronize(device)
                times[k].append((time.perf_counter() - start) / args.steps)
                print(f"{name} round {r + 1} {k}: {times[k][-1]:.4f} s/step", file=sys.stderr)
        median = {k: statistics.median(v) for k, v in times.items()}
        results[name] = {
            **case,
            "seconds_per_step": times,
            "median_seconds_per_step": median,
            "peak_bytes": memory,
            "time_ours_over_opacus": median["ours"] / median["opacus"],
            "memory_ours_over_opacus": memory["ours"] / memory["opacus"],
        }

    import opacus as _opacus

    table = [
        "| model | batch | ours s/step | Opacus s/step | time ÷ | ours peak MiB "
        "| Opacus peak MiB | memory ÷ |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        m, p = r["median_seconds_per_step"], r["peak_bytes"]
        table.append(
            f"| {name} | {r['batch']} | {m['ours']:.4f} | {m['opacus']:.4f} "
            f"| {r['time_ours_over_opacus']:.2f} | {p['ours'] / 2**20:.1f} "
            f"| {p['opacus'] / 2**20:.1f} | {r['memory_ours_over_opacus']:.2f} |"
        )
    write_benchmark(
        "dpsgd_vs_opacus",
        f"DP-SGD step: labeldp vs Opacus {_opacus.__version__}",
        device,
        {"opacus": _opacus.__version__, "cases": results},
        [
            f"- one step = per-example gradients, clip to C = {C}, noise σ = {SIGMA}, SGD; "
            f"{args.rounds} alternating rounds of {args.steps} steps, medians; peak memory "
            "of one step (CUDA: allocator; CPU: resident-set high-water mark)"
        ],
        table,
        argv,
        args.out_dir,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
