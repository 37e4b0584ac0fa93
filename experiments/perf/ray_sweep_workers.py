"""Benchmark: a 4-run sweep on a Ray instance of 2 CPUs against 1 (one CPU, one torch
thread per run), and the local backend's 1 and 2 workers beside it, in one process.

The sweep: rr at ε = 1, 2, 4, 8 (seed 0) on ``--train-size`` Fashion-MNIST examples,
``--epochs`` epochs of the small CNN at batch 128, no canaries. Each configuration runs
into its own fresh store and runs folder, Ray started anew for each Ray configuration
(its start-up, a few seconds, is part of the wall time, as for a user). The wall time is
the whole ``run_sweep`` call; the ratio is 1 worker's time over 2 workers'. Ray's
ideal is 2×: the runs are independent, so what it loses is start-up, the tasks' data
loading and the last run's tail (4 runs on 2 workers: no tail here).

    python experiments/perf/ray_sweep_workers.py
writes results/perf/ray_sweep_workers-cpu.{json,md}. Needs the extra labeldp[ray].
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from benchmark_record import write_benchmark  # the sibling module in experiments/perf

from labeldp.backends import LocalBackend, RayBackend
from labeldp.runner import Environment
from labeldp.store import ResultsStore
from labeldp.sweep import SweepSpec, run_sweep

SWEEP = """
name = "ray_bench"
dataset = "fashion-mnist"
methods = ["rr"]
epsilons = [1, 2, 4, 8]
seeds = [0]
include_nonprivate = false
train_size = {train_size}
[train]
epochs = {epochs}
batch_size = 128
eval_every = 100
"""


def measure(name: str, backend, spec: SweepSpec, env: Environment, root: Path) -> dict:
    folder = root / name
    folder.mkdir()
    began = time.perf_counter()
    ran = run_sweep(spec, ResultsStore(folder / "runs.sqlite"), folder / "runs", env, backend)
    seconds = time.perf_counter() - began
    rows = ResultsStore(folder / "runs.sqlite").rows(spec.name)
    accuracies = sorted((r["name"], r["test_accuracy"]) for r in rows)
    print(f"{name}: {ran} runs in {seconds:.1f} s")
    return {"seconds": seconds, "runs": ran, "accuracies": accuracies}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-size", type=int, default=6000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out-dir", default="results/perf")
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local instance only
    root = Path(tempfile.mkdtemp(prefix="ray-bench-"))
    try:
        path = root / "ray_bench.toml"
        path.write_text(SWEEP.format(train_size=args.train_size, epochs=args.epochs))
        spec = SweepSpec.load(path)
        env = Environment(data_dir=args.data_dir, progress=False)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # the local single worker at the Ray runs' thread count
        results = {"local-1": measure("local-1", LocalBackend(1), spec, env, root)}
        torch.set_num_threads(threads)
        results["local-2"] = measure("local-2", LocalBackend(2), spec, env, root)
        for cpus in (1, 2):
            backend = RayBackend(num_cpus=cpus, cpus_per_run=1)
            results[f"ray-{cpus}"] = measure(f"ray-{cpus}", backend, spec, env, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    ray_ratio = results["ray-1"]["seconds"] / results["ray-2"]["seconds"]
    local_ratio = results["local-1"]["seconds"] / results["local-2"]["seconds"]
    same = results["ray-1"]["accuracies"] == results["ray-2"]["accuracies"]
    table = [
        "| backend | workers | wall s | 1 worker ÷ 2 workers |",
        "|---|---|---|---|",
        f"| ray | 1 | {results['ray-1']['seconds']:.1f} | |",
        f"| ray | 2 | {results['ray-2']['seconds']:.1f} | {ray_ratio:.2f}× |",
        f"| local | 1 | {results['local-1']['seconds']:.1f} | |",
        f"| local | 2 | {results['local-2']['seconds']:.1f} | {local_ratio:.2f}× |",
        "",
        f"Ray's two runs of each configuration stored the same accuracies: {same}.",
    ]
    setup = [
        f"- sweep: rr at ε = 1, 2, 4, 8 on {args.train_size} Fashion-MNIST examples, "
        f"{args.epochs} epochs of the small CNN (batch 128), no canaries; a fresh store each",
        "- Ray: an instance started in this process with 1 or 2 CPUs, one CPU (one torch "
        "thread) per run, run folders shared (this machine); its start-up is in the time",
        "- local: 1 worker (this process, one torch thread) and 2 worker processes (one "
        "thread each)",
    ]
    write_benchmark(
        "ray_sweep_workers", "A 4-run sweep: 2 Ray workers against 1", torch.device("cpu"),
        {"results": results, "ray_ratio": ray_ratio, "local_ratio": local_ratio,
         "train_size": args.train_size, "epochs": args.epochs},
        setup, table, argv, args.out_dir,
    )  # fmt: skip


if __name__ == "__main__":
    main()
