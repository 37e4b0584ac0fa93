"""Benchmark: one DP-SGD step of labeldp against Opacus and against a non-private step, in one
process.

Every DP contender computes per-example gradients of the same model on the same batch,
clips them to C = 1, adds Gaussian noise (σ = 1) to the sum, divides by the batch size and
takes an SGD step:

- ``ours``: :func:`labeldp.dpsgd.make_private` on the model, the user's plain loop
  (``loss.backward(); optimizer.step()``): hooks + per-layer formulas, norms by the cheaper
  of a materialized product and a ghost (Gram-matrix) norm per layer, then the clipped sum
  without per-example gradients;
- ``ours-core``: ``labeldp.train.dpsgd.DPSGDStep``, the step ``labeldp train --method
  dp-sgd`` runs (the same per-layer functions, one forward and one backward);
- ``opacus``: Opacus' ``GradSampleModule`` (hooks mode, materialized per-example
  gradients) + ``DPOptimizer``, its standard path;
- ``opacus-ghost``: Opacus' ghost clipping (``GradSampleModuleFastGradientClipping``,
  ``DPOptimizerFastGradientClipping``, ``DPLossFastGradientClipping``: norms, then a second
  weighted backward);
- ``non-private``: the model with PyTorch's own layers (fused nn.LSTM and
  nn.MultiheadAttention for the sequence models), cross-entropy, backward, SGD.

Models: the Fashion-MNIST CNN (batch 256), ResNet-18 with GroupNorm on 32×32×3 inputs
(batch 64 on CPU, 256 on CUDA), the LSTM over Fashion-MNIST rows (``lstm-rows``: 28 steps,
128 units, batch 256) and the transformer over 7×7 patches (``vit-patches``: 16 tokens,
width 64, 2 blocks, batch 256). The DP contenders take the models' DP forms (labeldp's
DPLSTM / DPMultiheadAttention for ours, Opacus' by ``ModuleValidator.fix`` for Opacus),
all with the same weights. The batch is fixed (not Poisson) so all do identical work, as
one physical batch.

Step time: rounds alternate the contenders' order (forwards, then backwards) so drift of
the machine hits all alike; medians over ``--steps`` timed steps per round after warm-up.

Peak memory (the median over three steps): on CUDA, ``torch.cuda.max_memory_allocated``
over one step, minus what was allocated before it. On CPU there is no allocator counter,
so the peak resident set is read from the kernel: /proc/self/clear_refs resets VmHWM, one
step runs, and the peak is VmHWM minus the resident size before the step. glibc would
otherwise keep freed blocks and hide re-use, so memory is measured in a child process
started with MALLOC_MMAP_THRESHOLD_=65536 (every tensor above 64 KiB is mapped and
unmapped on its own), one contender alive at a time; the step times are taken in the
parent with glibc's usual allocator (forced mmaps would charge page faults to every step).

    python experiments/perf/dpsgd_vs_opacus.py
writes results/perf/dpsgd_vs_opacus-<device>.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from benchmark_record import write_benchmark  # the sibling module in experiments/perf
from torch.utils.data import DataLoader, TensorDataset

from labeldp.dpsgd import fix, make_private
from labeldp.models import PatchTransformer, RowLSTM, build_model
from labeldp.train import HardLabels, resolve_device
from labeldp.train.dpsgd import DPSGDStep

C, SIGMA, LR = 1.0, 1.0, 0.1
MMAP_ENV = "MALLOC_MMAP_THRESHOLD_"
CONTENDERS = ["ours", "ours-core", "opacus", "opacus-ghost", "non-private"]


def cases(device: torch.device) -> dict[str, dict]:
    larger_batch = 256 if device.type == "cuda" else 64
    return {
        "cnn-fmnist": {"model": "cnn", "shape": (1, 28, 28), "batch": 256},
        "resnet18-gn-cifar": {"model": "resnet18", "shape": (3, 32, 32), "batch": larger_batch},
        "lstm-fmnist-rows": {"model": "lstm-rows", "shape": (1, 28, 28), "batch": 256},
        "vit-fmnist-patches": {"model": "vit-patches", "shape": (1, 28, 28), "batch": 256},
    }


def plain_model(case: dict, device: torch.device) -> torch.nn.Module:
    """The model with PyTorch's own layers (fused LSTM and attention), seeded weights."""
    torch.manual_seed(0)
    c, h, _ = case["shape"]
    if case["model"] == "lstm-rows":
        model = RowLSTM(10, in_channels=c, image_size=h, fused=True)
    elif case["model"] == "vit-patches":
        model = PatchTransformer(10, in_channels=c, image_size=h, fused=True)
    else:
        model = build_model(
            case["model"], num_classes=10, in_channels=c, image_size=h, norm="group"
        )
    return model.to(device)


def _memory_format(case: dict) -> torch.memory_format:
    sequence = case["model"] in ("lstm-rows", "vit-patches")
    return torch.contiguous_format if sequence else torch.channels_last


def ours_model(case: dict, device: torch.device) -> torch.nn.Module:
    """labeldp's DP form of the plain model (DPLSTM, DPMultiheadAttention), same weights."""
    model = fix(copy.deepcopy(plain_model(case, device)))
    return model.to(device, memory_format=_memory_format(case))


def opacus_model(case: dict, device: torch.device) -> torch.nn.Module:
    """Opacus' DP form of the plain model (its DPLSTM, DPMultiheadAttention), same weights."""
    from opacus.validators import ModuleValidator

    model = ModuleValidator.fix(copy.deepcopy(plain_model(case, device)))
    return model.to(device, memory_format=_memory_format(case))


def user_loop_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer):
    """One step of a plain user loop: cross-entropy, backward, step; zero_grad after it
    too, so that gradients (and Opacus' grad samples) are freed before the next step."""

    def run(x: torch.Tensor, y: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return run


def ours(case: dict, device: torch.device):
    model = ours_model(case, device)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    data = TensorDataset(torch.zeros(case["batch"] * 4, 1), torch.zeros(case["batch"] * 4))
    model, optimizer, _ = make_private(
        model,
        optimizer,
        DataLoader(data, batch_size=case["batch"]),
        max_grad_norm=C,
        noise_multiplier=SIGMA,
        delta=1e-5,
        seed=0,
    )
    assert optimizer.expected_batch_size == case["batch"]  # q·N of the dummy: the timed batch

    return user_loop_step(model, optimizer)


def ours_core(case: dict, device: torch.device):
    model = ours_model(case, device)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    step = DPSGDStep(C, SIGMA, expected_batch_size=case["batch"], physical_batch_size=case["batch"])

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

    model = GradSampleModule(opacus_model(case, device))
    optimizer = DPOptimizer(
        torch.optim.SGD(model.parameters(), lr=LR),
        noise_multiplier=SIGMA,
        max_grad_norm=C,
        expected_batch_size=case["batch"],
    )

    return user_loop_step(model, optimizer)


def opacus_ghost(case: dict, device: torch.device):
    from opacus.grad_sample import GradSampleModuleFastGradientClipping
    from opacus.optimizers import DPOptimizerFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

    model = GradSampleModuleFastGradientClipping(
        opacus_model(case, device), max_grad_norm=C, use_ghost_clipping=True
    )
    optimizer = DPOptimizerFastGradientClipping(
        torch.optim.SGD(model.parameters(), lr=LR),
        noise_multiplier=SIGMA,
        max_grad_norm=C,
        expected_batch_size=case["batch"],
    )
    criterion = DPLossFastGradientClipping(
        model, optimizer, torch.nn.CrossEntropyLoss(reduction="mean")
    )

    def run(x: torch.Tensor, y: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = criterion(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return run


def non_private(case: dict, device: torch.device):
    model = plain_model(case, device).to(memory_format=_memory_format(case))
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)

    return user_loop_step(model, optimizer)


BUILDERS = {
    "ours": ours,
    "ours-core": ours_core,
    "opacus": opacus,
    "opacus-ghost": opacus_ghost,
    "non-private": non_private,
}


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


def batch(case: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    x = torch.randn(case["batch"], *case["shape"], device=device).contiguous(
        memory_format=_memory_format(case)
    )
    return x, torch.randint(0, 10, (case["batch"],), device=device)


def measure_memory(case: dict, device: torch.device) -> dict[str, float]:
    """Peak extra bytes of one step per contender: the median of three steps, after two
    warm-up steps (on CPU only in a process started with MALLOC_MMAP_THRESHOLD_)."""
    if device.type == "cpu" and os.environ.get(MMAP_ENV) != "65536":
        raise RuntimeError(f"CPU peak memory needs {MMAP_ENV}=65536 (see the docstring)")
    x, y = batch(case, device)
    peaks: dict[str, float] = {}
    for k in CONTENDERS:
        run = BUILDERS[k](case, device)
        run(x, y)
        run(x, y)
        peaks[k] = statistics.median(peak_bytes(run, x, y, device) for _ in range(3))
        del run
    return peaks


def memory_in_child(names: list[str], device: str) -> dict[str, dict[str, float]]:
    """Runs this script with ``--memory-json`` under MALLOC_MMAP_THRESHOLD_=65536 and
    returns its peaks; the timing stays in this process, with glibc's usual allocator."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "memory.json"
        command = [sys.executable, __file__, "--cases", ",".join(names), "--device", device]
        subprocess.run(
            [*command, "--memory-json", str(out)],
            env={**os.environ, MMAP_ENV: "65536"},
            check=True,
        )
        return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out-dir", default="results/perf")
    parser.add_argument("--cases", default=None, help="comma-separated case names (default all)")
    parser.add_argument("--memory-json", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    selected = cases(device)
    if args.cases:
        selected = {k: v for k, v in selected.items() if k in args.cases.split(",")}
    if args.memory_json:  # the child process that measures peak memory on CPU
        peaks = {name: measure_memory(case, device) for name, case in selected.items()}
        Path(args.memory_json).write_text(json.dumps(peaks))
        return 0
    cpu_peaks: dict[str, dict[str, float]] = {}
    if device.type == "cpu":
        cpu_peaks = memory_in_child(list(selected), args.device)

    results: dict[str, dict] = {}
    for name, case in selected.items():
        x, y = batch(case, device)
        runners = {k: BUILDERS[k](case, device) for k in CONTENDERS}
        for run in runners.values():  # warm-up
            run(x, y)
            run(x, y)
        memory = cpu_peaks[name] if device.type == "cpu" else measure_memory(case, device)
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
            "time_ours_over_opacus_ghost": median["ours"] / median["opacus-ghost"],
            "time_ours_over_non_private": median["ours"] / median["non-private"],
            "memory_ours_over_opacus": memory["ours"] / memory["opacus"],
            "memory_ours_over_opacus_ghost": memory["ours"] / memory["opacus-ghost"],
            "memory_ours_over_non_private": memory["ours"] / memory["non-private"],
        }

    import opacus as _opacus

    table = [
        "| model | batch | s/step: ours | ours-core | Opacus | Opacus ghost | non-private "
        "| time ours ÷ Opacus | ÷ Opacus ghost | peak MiB: ours | ours-core | Opacus "
        "| Opacus ghost | non-private | memory ours ÷ Opacus | ÷ Opacus ghost | ÷ non-private |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        m, p = r["median_seconds_per_step"], r["peak_bytes"]
        times_cells = " | ".join(f"{m[k]:.4f}" for k in CONTENDERS)
        memory_cells = " | ".join(f"{p[k] / 2**20:.1f}" for k in CONTENDERS)
        table.append(
            f"| {name} | {r['batch']} | {times_cells} | {r['time_ours_over_opacus']:.2f} "
            f"| {r['time_ours_over_opacus_ghost']:.2f} | {memory_cells} "
            f"| {r['memory_ours_over_opacus']:.2f} | {r['memory_ours_over_opacus_ghost']:.2f} "
            f"| {r['memory_ours_over_non_private']:.2f} |"
        )
    write_benchmark(
        "dpsgd_vs_opacus",
        f"DP-SGD step: labeldp vs Opacus {_opacus.__version__} vs non-private",
        device,
        {"opacus": _opacus.__version__, "cases": results},
        [
            f"- one step = per-example gradients, clip to C = {C}, noise σ = {SIGMA}, SGD; "
            f"{args.rounds} alternating rounds of {args.steps} steps, medians; peak memory "
            "of one step, median of 3 (CUDA: allocator; CPU: resident-set high-water mark); ours = "
            "labeldp.dpsgd.make_private on the user's loop, ours-core = labeldp train's "
            "DPSGDStep; targets: time ≤ 0.8× Opacus, memory ≤ 1.0× Opacus and ≤ 1.5× "
            "non-private"
        ],
        table,
        argv,
        args.out_dir,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
