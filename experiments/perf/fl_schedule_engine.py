"""Benchmark: the federated schedule engine (phase A, :func:`labeldp.fl.schedule.
simulate_schedule`) at a million clients and a million trips.

Each configuration simulates ``--clients`` clients on the virtual clock, with exponential
trip durations (mean 1) unless said otherwise:

- async: FedBuff with concurrency C = ``--concurrency`` and buffer K = ``--buffer``, for
  ``--server-steps`` server updates (K × steps ≈ trips);
- async-lognormal: the same with lognormal durations (σ = 1) × a persistent per-client
  speed factor (σ = 0.5) × the client's data size over the mean (lognormal client sizes):
  the per-client factors path;
- poisson: clients start at Poisson times with rate C per unit time (≈ C training at once),
  same K and steps;
- sync: FedAvg rounds of M = ``--cohort`` clients with 30 % over-selection (late trips
  dropped), ``--sync-rounds`` rounds;
- capped-<steps>: async with a participation cap of ``--cap`` trips per client (user-level
  DP's m) over ``--capped-clients`` clients, for each of ``--capped-steps``: as the
  schedule uses up the clients the eligible set shrinks, and below 10 % of the clients
  selection falls back from rejection sampling to a scan of all clients per pick.

Each configuration runs ``--rounds`` times, each run in a fresh subprocess (so its peak
resident memory, ``resource.getrusage`` max RSS, is its own), rotating the order; the report
gives the median seconds of ``simulate_schedule`` alone, events (trips) per second, server
steps per second and the peak RSS (with the RSS before the call, the interpreter, torch
and numpy).

    python experiments/perf/fl_schedule_engine.py
writes results/perf/fl_schedule_engine-cpu.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from benchmark_record import write_benchmark  # the sibling module in experiments/perf

from labeldp.fl.durations import Durations
from labeldp.fl.population import client_sizes
from labeldp.fl.schedule import ScheduleConfig, simulate_schedule


def configurations(args) -> dict[str, dict]:
    """name → {"schedule": ScheduleConfig keyword arguments, "clients": how many,
    "sizes": whether clients get lognormal sizes}."""
    exp = {"kind": "exponential", "mean": 1.0}
    async_ = {"mode": "async", "concurrency": args.concurrency, "buffer_size": args.buffer,
              "server_steps": args.server_steps}  # fmt: skip
    return {
        "async": {"schedule": {**async_, "durations": exp}, "clients": args.clients},
        "async-lognormal": {
            "schedule": {
                **async_,
                "durations": {
                    "kind": "lognormal",
                    "mean": 1.0,
                    "spread": 1.0,
                    "speed_sigma": 0.5,
                    "scale_by_size": True,
                },
            },
            "clients": args.clients,
            "sizes": True,
        },
        "poisson": {
            "schedule": {**async_, "durations": exp, "arrival_rate": float(args.concurrency)},
            "clients": args.clients,
        },
        "sync": {
            "schedule": {
                "mode": "sync",
                "concurrency": args.cohort,
                "over_selection": 0.3,
                "server_steps": args.sync_rounds,
                "durations": exp,
            },
            "clients": args.clients,
        },
        **{
            f"capped-{steps}": {
                "schedule": {
                    **async_,
                    "server_steps": steps,
                    "durations": exp,
                    "participation_cap": args.cap,
                },
                "clients": args.capped_clients,
            }
            for steps in args.capped_steps
        },
    }


def worker(spec: dict) -> dict:
    """Runs one configuration in this process; returns its measurements."""
    kw = dict(spec["schedule"])
    kw["durations"] = Durations(**kw["durations"])
    config = ScheduleConfig(**kw)
    n = spec["clients"]
    sizes = (
        client_sizes("lognormal", n, 40 * n, 0, min_size=20, sigma=0.5)
        if spec.get("sizes")
        else None
    )
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    began = time.perf_counter()
    schedule = simulate_schedule(config, n, np.random.default_rng(0), sizes)
    seconds = time.perf_counter() - began
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    aggregated = int(schedule.aggregated.sum())
    return {
        "seconds": seconds,
        "trips": len(schedule),
        "trips_aggregated": aggregated,
        "trips_unaggregated": len(schedule) - aggregated,
        "server_steps": schedule.server_steps,
        "distinct_clients": int(len(np.unique(schedule.client))),
        "stopped_early": schedule.stopped_early,
        "staleness": schedule.staleness_summary(),
        "mean_concurrency": schedule.mean_concurrency(),
        "virtual_time": float(schedule.flush_time[-1]) if schedule.server_steps else 0.0,
        "max_rss_mib_before": rss_before / 1024,
        "max_rss_mib_peak": rss_peak / 1024,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=1_000_000)
    parser.add_argument("--concurrency", type=int, default=1000, help="async C")
    parser.add_argument("--buffer", type=int, default=10, help="async K")
    parser.add_argument("--server-steps", type=int, default=100_000)
    parser.add_argument("--cohort", type=int, default=1000, help="sync M")
    parser.add_argument("--sync-rounds", type=int, default=1000)
    parser.add_argument("--cap", type=int, default=1, help="participation cap (capped runs)")
    parser.add_argument("--capped-clients", type=int, default=100_000)
    parser.add_argument(
        "--capped-steps", type=int, nargs="*", default=[8_000, 9_000],
        help="server steps of the capped runs (one run each)",
    )  # fmt: skip
    parser.add_argument("--only", nargs="+", help="run only these configurations")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out-dir", default="results/perf")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # one run: a JSON spec
    args = parser.parse_args(argv)
    if args.worker is not None:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    specs = configurations(args)
    if args.only:
        specs = {k: v for k, v in specs.items() if k in args.only}
    runs: dict[str, list[dict]] = {k: [] for k in specs}
    script = str(Path(__file__).resolve())
    load_before = os.getloadavg()
    for r in range(args.rounds):
        names = list(specs)
        names = names[r % len(names) :] + names[: r % len(names)]
        for name in names:
            done = subprocess.run(
                [sys.executable, script, "--worker", json.dumps(specs[name])],
                check=True, capture_output=True, text=True,
            )  # fmt: skip
            runs[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
            m = runs[name][-1]
            print(
                f"round {r + 1} {name}: {m['trips']} trips in {m['seconds']:.2f} s, "
                f"peak RSS {m['max_rss_mib_peak']:.0f} MiB",
                file=sys.stderr,
            )
    load_after = os.getloadavg()
    summary = {}
    for name, ms in runs.items():
        first = ms[0]
        seconds = statistics.median(m["seconds"] for m in ms)
        summary[name] = {
            "spec": specs[name],
            "seconds": [m["seconds"] for m in ms],
            "median_seconds": seconds,
            "trips": first["trips"],
            "trips_aggregated": first["trips_aggregated"],
            "server_steps": first["server_steps"],
            "distinct_clients": first["distinct_clients"],
            "stopped_early": first["stopped_early"],
            "staleness": first["staleness"],
            "mean_concurrency": first["mean_concurrency"],
            "virtual_time": first["virtual_time"],
            "events_per_second": first["trips"] / seconds,
            "server_steps_per_second": first["server_steps"] / seconds,
            "us_per_event": 1e6 * seconds / first["trips"],
            "max_rss_mib_before": statistics.median(m["max_rss_mib_before"] for m in ms),
            "max_rss_mib_peak": statistics.median(m["max_rss_mib_peak"] for m in ms),
        }

    def what(name: str) -> str:
        s = specs[name]["schedule"]
        if s["mode"] == "sync":
            return f"sync M = {s['concurrency']}, over-selection 0.3"
        text = f"async K = {s['buffer_size']}, " + (
            f"Poisson rate {s['arrival_rate']:g}"
            if "arrival_rate" in s
            else f"C = {s['concurrency']}"
        )
        d = s["durations"]
        if d["kind"] != "exponential":
            text += f", {d['kind']} × speed × size"
        if s.get("participation_cap"):
            text += f", cap {s['participation_cap']}"
        return text

    rows = [
        f"| {name} | {what(name)} | {m['spec']['clients']:,} | {m['trips']:,} | "
        f"{m['server_steps']:,} | {m['median_seconds']:.2f} | **{m['events_per_second']:,.0f}** | "
        f"{m['us_per_event']:.2f} | {m['server_steps_per_second']:,.0f} | "
        f"{m['staleness']['mean']:.1f} / {m['staleness']['p99']:.0f} | "
        f"{m['max_rss_mib_peak']:.0f} ({m['max_rss_mib_before']:.0f}) |"
        for name, m in summary.items()
    ]
    write_benchmark(
        "fl_schedule_engine",
        "Federated schedule engine (simulate_schedule): events per second",
        torch.device("cpu"),
        {
            "rounds": args.rounds,
            "load_average_before_after": [load_before, load_after],
            "configurations": summary,
        },
        [
            f"- `simulate_schedule` alone (no training), seed 0, {args.rounds} rounds, each run "
            "in a fresh subprocess, order rotated; medians; an event is a trip (a dispatch and "
            "its arrival); exponential durations (mean 1) unless said; load average (1 min) "
            f"{load_before[0]:.2f} before, {load_after[0]:.2f} after",
            "- peak RSS: the worker process's `ru_maxrss` after the call (in brackets: before "
            "it, i.e. Python + torch + numpy + the inputs)",
        ],
        [
            "| run | schedule | clients | trips (events) | server steps | median s | events/s "
            "| µs / event | server steps/s | staleness mean / p99 | peak RSS MiB (before) |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
            *rows,
        ],
        argv,
        args.out_dir,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
