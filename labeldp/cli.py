"""The ``labeldp`` command line.

Errors a user can cause print one line (at most MAX_ERROR_CHARS characters) and exit with
status 2 (bad options) or 1 (data, a run's record or the results store missing or corrupt,
a full disk, a path that cannot be written: the line names the file and what to do); an
interrupted run exits with 130 (Ctrl-C) or 143 (SIGTERM) and can be continued with
``--resume``.
"""

from __future__ import annotations

import argparse
import errno
import math
import signal
import sqlite3
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from . import __version__
from . import experiments as packaged
from .backends import BACKENDS, RUN_FOLDERS
from .data import DATASETS, fetch
from .errors import ConfigError, DataError
from .io import DiskFullError, read_json
from .methods import METHODS, method_options
from .models import MODELS
from .options import flags
from .recipes import RUN_FIELDS, recipe
from .runner import SEEDED_CONDITION, Environment, RunConfig, format_epsilon, train_run
from .train import TrainConfig
from .train.config import PRECISIONS, SCHEDULES


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad option as one line (no usage dump), status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _number(
    kind: Callable[[str], Any],
    low: float,
    *,
    strict: bool = False,
    high: float | None = None,
    high_inclusive: bool = False,
):
    """An argparse type: ``kind`` in [low, high) (or (low, high) with ``strict``; the
    upper end included with ``high_inclusive``)."""
    bound = f"> {low:g}" if strict else f"≥ {low:g}"
    if high is not None:
        close = "]" if high_inclusive else ")"
        bound = f"in {'(' if strict else '['}{low:g}, {high:g}{close}"
    noun = "an integer" if kind is int else "a number"

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {noun} {bound}, got {text!r}") from None
        too_low = value <= low if strict else value < low
        too_high = high is not None and (value > high if high_inclusive else value >= high)
        if too_low or too_high or (isinstance(value, float) and not math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"must be {noun} {bound}, got {text!r}")
        return value

    return parse


def _add_train_parser(sub: argparse._SubParsersAction) -> None:
    defaults = TrainConfig(epochs=1)
    p = sub.add_parser(
        "train",
        help="train one model with one method and record the run",
        description="Train one model with one label-privacy method (or none) and write "
        "OUT/config.json, OUT/metrics.json and OUT/model.pt.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    what = p.add_argument_group("what to train")
    what.add_argument(
        "--dataset", required=True, choices=list(DATASETS), help="dataset to train on"
    )
    what.add_argument(
        "--method",
        default="none",
        choices=list(METHODS),
        help="label-privacy method; none = non-private training on the true labels",
    )
    what.add_argument(
        "--model",
        default=argparse.SUPPRESS,
        metavar="NAME",
        help=f"model: {', '.join(MODELS)} or wrn<depth>-<width>"
        + RECIPE_NOTE.format("cnn for 28x28 data, resnet18 for CIFAR"),
    )
    what.add_argument(
        "--norm",
        default=argparse.SUPPRESS,
        choices=["batch", "group"],
        help="normalization layers (DP-SGD needs group)" + RECIPE_NOTE.format("batch"),
    )
    what.add_argument(
        "--train-size",
        type=_number(int, 1),
        default=None,
        metavar="N",
        help="train on a seeded random subset of N training examples (default: all)",
    )
    what.add_argument(
        "--validation-size",
        type=_number(int, 1),
        default=None,
        metavar="N",
        help="hold out N training examples as a validation split (the same for every run) "
        "and evaluate on it instead of the test split, for choosing hyper-parameters",
    )
    _add_method_flags(p)
    audit = p.add_argument_group("auditing (read by labeldp attack)")
    audit.add_argument(
        "--canaries",
        type=_number(int, 0),
        default=0,
        metavar="M",
        help="replace M random training labels by random wrong labels before the "
        "method sees them (memorization attack); M control test images too",
    )
    audit.add_argument(
        "--audit-canaries",
        type=_number(int, 0),
        default=0,
        metavar="M",
        help="M canaries labelled by a fair coin between two labels (one-run audit)",
    )
    how = p.add_argument_group("optimization")
    how.add_argument(
        "--epochs",
        type=_number(int, 1),
        default=argparse.SUPPRESS,
        help=f"passes over the training set{RECIPE_NOTE.format(DEFAULT_EPOCHS)}",
    )
    how.add_argument(
        "--batch-size",
        type=_number(int, 1),
        default=argparse.SUPPRESS,
        help=f"examples per step{RECIPE_NOTE.format(defaults.batch_size)}",
    )
    how.add_argument(
        "--lr",
        type=_number(float, 0, strict=True),
        default=argparse.SUPPRESS,
        help=f"peak learning rate{RECIPE_NOTE.format(defaults.lr)}",
    )
    how.add_argument(
        "--momentum",
        type=_number(float, 0, high=1),
        default=argparse.SUPPRESS,
        help="SGD momentum (Nesterov unless --no-nesterov)" + RECIPE_NOTE.format(defaults.momentum),
    )
    how.add_argument(
        "--no-nesterov",
        dest="nesterov",
        action="store_false",
        default=argparse.SUPPRESS,
        help="plain momentum" + RECIPE_NOTE.format("Nesterov"),
    )
    how.add_argument(
        "--weight-decay",
        type=_number(float, 0),
        default=argparse.SUPPRESS,
        help="L2 weight decay" + RECIPE_NOTE.format(defaults.weight_decay),
    )
    how.add_argument(
        "--schedule",
        choices=SCHEDULES,
        default=argparse.SUPPRESS,
        help="learning-rate schedule" + RECIPE_NOTE.format(defaults.schedule),
    )
    how.add_argument(
        "--warmup-fraction",
        type=_number(float, 0, high=1),
        default=argparse.SUPPRESS,
        help="share of steps spent warming up" + RECIPE_NOTE.format(defaults.warmup_fraction),
    )
    how.add_argument(
        "--mixup",
        dest="mixup_alpha",
        type=_number(float, 0),
        default=argparse.SUPPRESS,
        metavar="ALPHA",
        help="mixup of inputs and targets with λ ~ Beta(α, α) per batch (0 = off)"
        + RECIPE_NOTE.format(0),
    )
    how.add_argument(
        "--ema",
        type=_number(float, 0, strict=True, high=1),
        default=argparse.SUPPRESS,
        metavar="DECAY",
        help="evaluate an exponential moving average of the weights" + RECIPE_NOTE.format("no EMA"),
    )
    how.add_argument(
        "--crop-padding",
        type=_number(int, 0),
        default=argparse.SUPPRESS,
        metavar="PIXELS",
        help="random-crop translation, 0 = off" + RECIPE_NOTE.format("1 for 28x28, 4 for 32x32"),
    )
    how.add_argument(
        "--hflip",
        dest="hflip",
        action="store_true",
        default=argparse.SUPPRESS,
        help="random horizontal flips" + RECIPE_NOTE.format("where the dataset allows"),
    )
    how.add_argument(
        "--no-hflip",
        dest="hflip",
        action="store_false",
        default=argparse.SUPPRESS,
        help="no horizontal flips",
    )
    how.add_argument(
        "--seed",
        type=_number(int, 0),
        default=0,
        help="seeds initialisation, subset, batch order, augmentation and noise",
    )
    run = p.add_argument_group("running")
    run.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="run folder (default runs/<dataset>-<method>-seed<seed>)",
    )
    run.add_argument(
        "--resume",
        action="store_true",
        help="continue the unfinished run in --out from its last checkpoint",
    )
    run.add_argument(
        "--shared-dir",
        default=None,
        metavar="DIR",
        help="folder shared with related runs for work that does not depend on the privacy "
        "parameters (pate-fm: teacher votes, reused by runs that differ only in ε, δ, "
        "threshold or noise); sweeps use <runs-dir>/<sweep>/shared",
    )
    run.add_argument(
        "--checkpoint-every",
        type=_number(int, 1),
        default=1,
        metavar="EPOCHS",
        help="write a checkpoint every this many epochs",
    )
    run.add_argument(
        "--eval-every",
        type=_number(int, 1),
        default=defaults.eval_every,
        metavar="EPOCHS",
        help="evaluate on the test split every this many epochs",
    )
    run.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    run.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=defaults.precision,
        help="auto = bf16 autocast on CUDA, fp32 on CPU",
    )
    run.add_argument(
        "--data-dir",
        default=None,
        metavar="DIR",
        help="where datasets are looked for first (then $LABELDP_DATA, system "
        "folders and the download cache)",
    )
    run.add_argument(
        "--no-download",
        dest="download",
        action="store_false",
        help="fail instead of downloading a missing dataset",
    )
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(handler=_train)


#: Every method option as one CLI flag (dest = the option's name), generated from the
#: methods' declarations (labeldp.options).
METHOD_FLAGS = {f.dest: f for f in flags((n, cls.Options) for n, cls in METHODS.items())}


def _add_method_flags(p: argparse.ArgumentParser) -> None:
    """The method options' flags, one group per set of methods that declares them; each
    help names the methods, the allowed values and the real defaults."""
    groups: dict[tuple[str, ...], Any] = {}
    for flag in METHOD_FLAGS.values():
        methods = tuple(m for m, _ in flag.declarations)
        if methods not in groups:
            groups[methods] = p.add_argument_group(
                f"options of {', '.join(methods)} (default: the method's recipe, else as shown)"
            )
        parsing = flag.kind.argparse_options()
        if flag.metavar:
            parsing["metavar"] = flag.metavar
        groups[methods].add_argument(
            flag.flag, dest=flag.dest, default=argparse.SUPPRESS, help=flag.help(), **parsing
        )


#: What an unset flag falls back to when the method's recipe does not set it (labeldp.recipes).
RECIPE_NOTE = " (default: the method's recipe, see `labeldp recipes`; else {})"
DEFAULT_EPOCHS = 8
#: TrainConfig field → argparse dest of the flags a recipe may supply.
RECIPE_TRAIN_FLAGS = {
    "epochs": "epochs",
    "batch_size": "batch_size",
    "lr": "lr",
    "momentum": "momentum",
    "nesterov": "nesterov",
    "weight_decay": "weight_decay",
    "schedule": "schedule",
    "warmup_fraction": "warmup_fraction",
    "ema_decay": "ema",
    "mixup_alpha": "mixup_alpha",
}


def _method_options(args: argparse.Namespace) -> dict[str, Any]:
    """The method hyper-parameters given on the command line; an option that the chosen
    method does not take is an error rather than silently ignored."""
    given = {dest: getattr(args, dest) for dest in METHOD_FLAGS if dest in args}
    declared = method_options(args.method)
    accepted = {spec.name for spec in declared}
    for dest in given:
        if dest not in accepted:
            takes = ", ".join(spec.flag for spec in declared) or "no method options"
            raise ConfigError(
                f"{METHOD_FLAGS[dest].flag} does not apply to --method {args.method} "
                f"(it takes {takes})"
            )
    missing = [spec for spec in declared if spec.required and spec.name not in given]
    if missing:
        raise ConfigError(
            f"--method {args.method} needs {', '.join(spec.flag for spec in missing)}"
        )
    return given


def _check_out(out: str) -> None:
    """Refuses a run folder that cannot be one: an existing file, or a path under a file."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder; choose another --out")
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(
                    f"--out {out} is under {parent}, which is a file, not a folder; "
                    "choose another --out"
                )
            break


def _train(args: argparse.Namespace) -> int:
    base = recipe(args.method, args.dataset)
    given = vars(args)
    chosen = {"epochs": DEFAULT_EPOCHS, **base.train}
    for name in RECIPE_TRAIN_FLAGS:
        if RECIPE_TRAIN_FLAGS[name] in given:
            chosen[name] = given[RECIPE_TRAIN_FLAGS[name]]
    train = TrainConfig(
        **chosen, seed=args.seed, eval_every=args.eval_every, precision=args.precision
    )
    run_fields = {**base.run, **{k: given[k] for k in RUN_FIELDS if k in given}}
    config = RunConfig(
        dataset=args.dataset,
        train=train,
        method=args.method,
        method_options={**base.options, **_method_options(args)},
        **run_fields,
        train_size=args.train_size,
        validation_size=args.validation_size,
        canaries=args.canaries,
        audit_canaries=args.audit_canaries,
    )
    env = Environment(
        data_dir=args.data_dir,
        download=args.download,
        device=args.device,
        progress=not args.quiet,
        checkpoint_every=args.checkpoint_every,
        shared_dir=args.shared_dir,
    )
    out = args.out or f"runs/{args.dataset}-{args.method}-seed{args.seed}"
    _check_out(out)
    if config.method != "none" and not config.method_options.get("secure_noise", False):
        print(f"note: {SEEDED_CONDITION}.", file=sys.stderr)
    record = train_run(config, out, env, resume=args.resume)
    print(
        f"{config.dataset} {config.method} ({record.model}, {record.train_size} examples): "
        f"{record.evaluation_split} accuracy {record.evaluation_accuracy:.4f}, "
        f"ε = {format_epsilon(record.epsilon)}, "
        f"{record.train_seconds:.0f} s training on {record.device} -> {out}"
    )
    if record.outcome == "diverged":
        print(
            "warning: training diverged (the loss or the weights became non-finite) and "
            f"stopped early; {out}/metrics.json records outcome 'diverged'. Lower --lr",
            file=sys.stderr,
        )
    if record.outcome == "collapsed":
        print(
            "warning: the model ended on the constant-prediction plateau (one class takes "
            f"most of its predictions); {out}/metrics.json records outcome 'collapsed'. With "
            "heavily noised labels lower --lr (or use the method's recipe)",
            file=sys.stderr,
        )
    return 0


def _add_recipes_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "recipes",
        help="print each method's default training per dataset",
        description="Print the training recipes (labeldp/recipes.py) that `labeldp train` "
        "and sweep files start from, with what was tried to choose them.",
    )
    p.add_argument("--dataset", choices=list(DATASETS), default=None, help="only this dataset")
    p.set_defaults(handler=_recipes)


def _recipes(args: argparse.Namespace) -> int:
    from .recipes import RECIPES

    for dataset, methods in RECIPES.items():
        if args.dataset not in (None, dataset):
            continue
        print(f"# {dataset}")
        for method in METHODS:
            if method not in methods:
                print(f"{method}: no recipe (TrainConfig defaults, {DEFAULT_EPOCHS} epochs)")
                continue
            r = methods[method]
            parts = [f"{k}={v}" for k, v in {**r.run, **r.train, **r.options}.items()]
            print(f"{method}: {', '.join(parts)}")
            if r.tuned:
                print(f"    chosen: {r.tuned}")
    return 0


def _add_data_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="obtain datasets", description="Obtain and check datasets.")
    data_sub = p.add_subparsers(dest="data_command", required=True, parser_class=_Parser)
    f = data_sub.add_parser(
        "fetch",
        help="make sure a dataset is on disk, downloading it (checksummed) if needed",
        description="Find DATASET (--data-dir, $LABELDP_DATA, system folders, the cache) or "
        "download it from its official location, verifying each file's checksum, then print "
        "the folder that holds it.",
    )
    f.add_argument("dataset", choices=list(DATASETS))
    f.add_argument("--data-dir", default=None, metavar="DIR", help="look and download here first")
    f.set_defaults(handler=lambda args: print(fetch(args.dataset, data_dir=args.data_dir)) or 0)


def _add_account_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "account",
        help="privacy accounting without training",
        description="Compute ε of a mechanism from its parameters, or calibrate its noise.",
    )
    kinds = p.add_subparsers(dest="kind", required=True, parser_class=_Parser)
    d = kinds.add_parser(
        "dp-sgd",
        help="ε of DP-SGD, or the noise multiplier for a target ε",
        description="ε (add/remove one example) of DP-SGD with Poisson sampling for a noise "
        "multiplier, or, with --epsilon, the noise multiplier that reaches that ε. The "
        "sample rate is --sample-rate, or --batch-size / --examples; the steps are --steps, "
        "or --epochs × ceil(examples / batch size).",
    )
    what = d.add_mutually_exclusive_group(required=True)
    what.add_argument("--noise-multiplier", type=_number(float, 0, strict=True), metavar="SIGMA")
    what.add_argument("--epsilon", type=_number(float, 0, strict=True), help="target ε")
    d.add_argument("--delta", type=_number(float, 0, strict=True, high=1), default=1e-5)
    d.add_argument(
        "--sample-rate",
        type=_number(float, 0, strict=True, high=1, high_inclusive=True),
        metavar="Q",
        help="Poisson sampling rate in (0, 1] (1: every example in every step)",
    )
    d.add_argument("--steps", type=_number(int, 1), metavar="T")
    d.add_argument("--examples", type=_number(int, 1), metavar="N")
    d.add_argument("--batch-size", type=_number(int, 1), metavar="B", help="expected batch size")
    d.add_argument("--epochs", type=_number(int, 1))
    d.add_argument("--accountant", choices=["pld", "rdp"], default="pld")
    d.set_defaults(handler=_account_dpsgd)


def _account_dpsgd(args: argparse.Namespace) -> int:
    from .privacy import calibrate_dpsgd_noise, dpsgd_epsilon
    from .privacy.dpsgd_accounting import MIN_NOISE_MULTIPLIER

    q = args.sample_rate
    if q is None:
        if args.examples is None or args.batch_size is None:
            raise ConfigError("give --sample-rate, or --examples and --batch-size")
        if args.batch_size > args.examples:
            raise ConfigError("--batch-size must be at most --examples")
        q = args.batch_size / args.examples
    steps = args.steps
    if steps is None:
        if args.epochs is None or args.examples is None or args.batch_size is None:
            raise ConfigError("give --steps, or --epochs with --examples and --batch-size")
        steps = args.epochs * -(-args.examples // args.batch_size)
    if args.epsilon is None:
        sigma = args.noise_multiplier
        if sigma < MIN_NOISE_MULTIPLIER:
            raise ConfigError(
                f"--noise-multiplier must be ≥ {MIN_NOISE_MULTIPLIER:g} (below it ε is "
                f"astronomically large and cannot be accounted), got {sigma:g}"
            )
    else:
        sigma = calibrate_dpsgd_noise(args.epsilon, args.delta, q, steps, args.accountant)
    eps = dpsgd_epsilon(sigma, q, steps, args.delta, args.accountant)
    print(
        f"noise multiplier {sigma:.6g}, sample rate {q:.6g}, steps {steps}: "
        f"ε = {eps:.6g} at δ = {args.delta:g} ({args.accountant}, add/remove one example)"
    )
    return 0


def _add_attack_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "attack",
        help="measure what finished runs leak: ε_LB next to ε",
        description="Run the memorization attack, the one-run audit and label inference on "
        "finished run folders; write RUN_DIR/attack.json and print a table.",
    )
    p.add_argument(
        "run_dirs", nargs="+", metavar="RUN_DIR", help="folders written by labeldp train"
    )
    p.add_argument(
        "--alpha",
        type=_number(float, 0, strict=True, high=1),
        default=0.05,
        help="significance level of the lower bounds",
    )
    p.set_defaults(handler=_attack)


def _attack(args: argparse.Namespace) -> int:
    from attacks.harness import attack_run, format_table

    for run_dir in args.run_dirs:  # a truncated record: one line naming it, no traceback
        for name in ("metrics.json", "config.json"):
            if (Path(run_dir) / name).is_file():
                read_json(
                    Path(run_dir) / name,
                    f"the run cannot be attacked; train it again (delete {run_dir} first)",
                )
    results = [attack_run(run_dir, alpha=args.alpha) for run_dir in args.run_dirs]
    print(format_table(results))
    for r in results:
        for note in r.notes:
            print(f"{r.run}: {note}")
    return 0


#: Profiles of `labeldp reproduce`: packaged sweep files (labeldp/experiments/, package
#: data read through importlib.resources), run in this order. Each profile's audits have
#: their own sweep, trained to memorize (see its file), run after the utility sweep; a
#: utility sweep naming it (``audits = ...``) shows its ε_LB.
PROFILES = {
    "quick": ("fashion_mnist_quick.toml", "fashion_mnist_quick_audits.toml"),
    "full": ("fashion_mnist_full.toml", "fashion_mnist_audits.toml"),
    "cifar10-paper": ("cifar10_paper.toml",),
    "cifar100-paper": ("cifar100_paper.toml",),
}
#: What the sweep commands' FILE argument may be.
SWEEP_FILE_HELP = (
    "the path of a sweep file (your own TOML file), or the name of a packaged one "
    "(e.g. fashion_mnist_quick; see labeldp/experiments/README.md)"
)


def _add_sweep_parsers(sub: argparse._SubParsersAction) -> None:
    common = _Parser(add_help=False)
    common.add_argument("--store", default="results/runs.sqlite", help="the SQLite results store")
    running = _Parser(add_help=False)
    running.add_argument("--runs-dir", default="runs", help="run folders go to RUNS_DIR/<sweep>/")
    running.add_argument(
        "--workers",
        type=_number(int, 1),
        default=None,
        help="runs at once (default 1; each gets an equal share of the CPU threads); "
        "with --backend ray and no --address: the runs at once on the Ray instance "
        "started here (default: as many as its CPUs allow)",
    )
    running.add_argument(
        "--backend",
        choices=BACKENDS,
        default="local",
        help="where runs execute: local (this machine) or ray (a Ray cluster; the optional "
        "extra labeldp[ray]); README: 'Sweeps on a Ray cluster'",
    )
    running.add_argument(
        "--address",
        default=None,
        metavar="ADDR",
        help="with --backend ray: the cluster to join ('auto' or HOST:PORT; default: start "
        "Ray on this machine)",
    )
    running.add_argument(
        "--run-folders",
        choices=RUN_FOLDERS,
        default="shared",
        help="with --backend ray: 'shared' (RUNS_DIR is the same path on every node) or "
        "'return' (runs train in node-local scratch and their folders come back)",
    )
    running.add_argument(
        "--cpus-per-run",
        type=_number(int, 1),
        default=1,
        help="with --backend ray: CPUs (and torch threads) each run asks for",
    )
    running.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    running.add_argument(
        "--data-dir", default=None, metavar="DIR", help="where datasets are looked for first"
    )
    running.add_argument("--quiet", action="store_true", help="no progress display")
    outputs = _Parser(add_help=False)
    outputs.add_argument("--results-dir", default="results", help="where tables go")
    outputs.add_argument("--figures-dir", default="paper_figs", help="where figures go")

    p = sub.add_parser(
        "sweep",
        parents=[common, running],
        help="run a sweep file's grid into the store",
        description="Run every grid point of a sweep file that the store does not hold "
        "yet. Resumable: after Ctrl-C or kill -9, rerun it. Packaged sweep files: "
        + ", ".join(packaged.names()),
    )
    p.add_argument("sweep_file", metavar="FILE", help=SWEEP_FILE_HELP)
    p.add_argument(
        "--only",
        default=None,
        metavar="PATTERN",
        help="run just the grid points whose names match this shell pattern, "
        "e.g. 'pate-fm-*-seed0' (names: <method>-eps<ε>-seed<seed>, none-seed<seed>)",
    )
    p.add_argument(
        "--allow-mixed-numerics",
        action="store_true",
        help="add runs to a sweep whose stored runs were made under another thread count, "
        "torch version or device (refused by default: the floating-point results differ)",
    )
    p.set_defaults(handler=_sweep)
    p = sub.add_parser(
        "report",
        parents=[common, outputs],
        help="write a sweep's tables",
        description="Write RESULTS_DIR/<sweep>.md and .csv from the store.",
    )
    p.add_argument("sweep_file", metavar="FILE", help=SWEEP_FILE_HELP)
    p.set_defaults(handler=_report)
    p = sub.add_parser(
        "plot",
        parents=[common, outputs],
        help="draw a sweep's figures",
        description="Draw FIGURES_DIR/<sweep>_utility and _audit (PNG and PDF).",
    )
    p.add_argument("sweep_file", metavar="FILE", help=SWEEP_FILE_HELP)
    p.set_defaults(handler=_plot)
    p = sub.add_parser(
        "reproduce",
        parents=[common, running, outputs],
        help="sweep, attack, report and plot one profile",
        description="Run a profile's sweep (with its attacks), then write its "
        "tables and figures. Profiles: "
        + ", ".join(f"{k} ({' + '.join(v)})" for k, v in PROFILES.items()),
    )
    p.add_argument("--profile", choices=list(PROFILES), default="quick")
    p.add_argument(
        "--only",
        default=None,
        metavar="PATTERN",
        help="run just the grid points whose names match this shell pattern in each sweep "
        "of the profile, e.g. 'none-*' (a sweep with no match is skipped, with a note); "
        "the tables and figures then show the runs the store holds",
    )
    p.set_defaults(handler=_reproduce)


def _federated(args: argparse.Namespace) -> Any:
    """The federated sweep of ``args.sweep_file`` (labeldp.fl.study), or None when the
    file is an ordinary sweep file."""
    from .fl.study import FederatedSweep, is_federated

    path = packaged.resolve(args.sweep_file)
    return FederatedSweep.load(path) if is_federated(path) else None


def _federated_store(args: argparse.Namespace, spec: Any) -> Any:
    from .fl.report import study_frame
    from .store import ResultsStore

    store = ResultsStore(args.store, create=False)
    if study_frame(store, spec).empty:
        raise ConfigError(
            f"the store {args.store} holds no runs of sweep {spec.name}; run labeldp sweep first"
        )
    return store


def _sweep(args: argparse.Namespace) -> int:
    from .sweep import SweepSpec

    study = _federated(args)
    if study is not None:
        from .fl.study import run_study
        from .store import ResultsStore

        run_study(study, ResultsStore(args.store), args.runs_dir, args.data_dir, args.device,
                  progress=not args.quiet, only=args.only, backend=_backend(args))  # fmt: skip
        return 0
    _run_sweep(args, SweepSpec.load(packaged.resolve(args.sweep_file)))
    return 0


def _backend(args: argparse.Namespace) -> Any:
    """The backend (labeldp.backends) that --backend, --workers, --address,
    --run-folders and --cpus-per-run describe."""
    from .backends import LocalBackend, RayBackend

    if args.backend == "local":
        _refuse_ray_flags({"--address": args.address is not None,
                           "--run-folders": args.run_folders != "shared",
                           "--cpus-per-run": args.cpus_per_run != 1})  # fmt: skip
        return LocalBackend(args.workers or 1)
    if args.address is not None and args.workers is not None:
        raise ConfigError(
            "--workers applies to the Ray instance started here; with --address the "
            "cluster's resources decide how many runs go at once"
        )
    return RayBackend(
        address=args.address,
        num_cpus=None if args.workers is None else args.workers * args.cpus_per_run,
        cpus_per_run=args.cpus_per_run,
        run_folders=args.run_folders,
    )


def _refuse_ray_flags(given: dict[str, bool]) -> None:
    """A ConfigError for the first Ray-only flag given (True) without --backend ray."""
    for flag, present in given.items():
        if present:
            raise ConfigError(f"{flag} applies to --backend ray only")


def _run_sweep(args: argparse.Namespace, spec: Any) -> None:
    from .store import ResultsStore
    from .sweep import run_sweep

    env = Environment(data_dir=args.data_dir, device=args.device, progress=not args.quiet)
    run_sweep(
        spec,
        ResultsStore(args.store),
        args.runs_dir,
        env,
        backend=_backend(args),
        only=args.only,
        allow_mixed_numerics=getattr(args, "allow_mixed_numerics", False),
    )


def _existing_store(args: argparse.Namespace, spec: Any) -> Any:
    """The store of ``report``/``plot``: never created here, and holding runs of the
    sweep's current grid (else one line: run labeldp sweep first)."""
    from .report import grid_rows
    from .store import ResultsStore

    store = ResultsStore(args.store, create=False)
    if grid_rows(store, spec).empty:
        raise ConfigError(
            f"the store {args.store} holds no runs of sweep {spec.name}; run labeldp sweep first"
        )
    return store


def _report(args: argparse.Namespace) -> int:
    from .sweep import SweepSpec

    study = _federated(args)
    if study is not None:
        from .fl.report import write_study_report

        store = _federated_store(args, study)
        for path in write_study_report(store, study, args.sweep_file, args.results_dir):
            print(path)
        return 0

    _write_report(args, SweepSpec.load(packaged.resolve(args.sweep_file)), args.sweep_file)
    return 0


def _write_report(args: argparse.Namespace, spec: Any, typed: str | Path) -> None:
    """Writes the tables of ``spec``; ``typed``: its sweep file as a user would type it."""
    from .report import write_report

    for path in write_report(_existing_store(args, spec), spec, typed, args.results_dir):
        print(path)


def _plot(args: argparse.Namespace) -> int:
    from .sweep import SweepSpec

    study = _federated(args)
    if study is not None:
        from paper_figs.fl_plots import write_study_figures

        for path in write_study_figures(_federated_store(args, study), study, args.figures_dir):
            print(path)
        return 0

    _draw(args, SweepSpec.load(packaged.resolve(args.sweep_file)))
    return 0


def _draw(args: argparse.Namespace, spec: Any) -> None:
    from paper_figs.plots import write_figures

    paths = write_figures(_existing_store(args, spec), spec, args.figures_dir)
    if not paths:
        raise ConfigError(
            f"the store {args.store} holds no runs of sweep {spec.name}; run labeldp sweep first"
        )
    for path in paths:
        print(path)


def _reproduce(args: argparse.Namespace) -> int:
    """Sweeps, reports and plots each packaged sweep file of the profile in order (with
    ``--only``, just the matching grid points; a sweep with none is skipped with a note);
    then writes again the report of every sweep whose audit sweep (``audits = ...``) ran
    after it, so that its side-by-side table holds the audit runs' ε_LB. Outputs go where
    the flags say (by default results/, runs/ and paper_figs/ under the current directory),
    never into the installed package."""
    from .sweep import SweepSpec, matching_runs

    sweeps = []  # (as typed, resolved, spec, whether --only matches a point of it)
    for name in PROFILES[args.profile]:  # every file checked before anything runs
        path = packaged.find(name).resolve()
        spec = SweepSpec.load(path)
        # `labeldp sweep <typed>` finds the packaged file from any directory
        typed = name.removesuffix(packaged.SUFFIX)
        sweeps.append((typed, path, spec, bool(matching_runs(spec, args.only))))
    if not any(matches for *_, matches in sweeps):
        raise ConfigError(
            f"--only {args.only!r} matches no run of any sweep of profile {args.profile} "
            f"({', '.join(PROFILES[args.profile])}); run names: <method>-eps<ε>-seed<seed>, "
            "none-seed<seed>"
        )
    done: list[tuple[str, Path, Any]] = []  # (as typed, resolved, spec) of each swept file
    for typed, path, spec, matches in sweeps:
        if not matches:
            print(
                f"labeldp reproduce: note: --only {args.only!r} matches no run of sweep "
                f"{spec.name} ({typed}); skipped",
                file=sys.stderr,
            )
            continue
        _run_sweep(args, spec)
        _write_report(args, spec, typed)
        _draw(args, spec)
        done.append((typed, path, spec))
    for i, (typed, resolved, spec) in enumerate(done):
        later = {p for _, p, _ in done[i + 1 :]}
        if spec.audits is not None and (resolved.parent / spec.audits).resolve() in later:
            _write_report(args, spec, typed)
    return 0


def _add_fl_parser(sub: argparse._SubParsersAction) -> None:
    from .fl.options import FederationOptions

    p = sub.add_parser(
        "fl",
        help="simulate one federation (FedAvg, FedAvgM, FedAsync, FedBuff)",
        description="Simulate a federation on a virtual clock (labeldp.fl): clients from a "
        "dataset, their trips scheduled from timing randomness, training replayed server "
        "version by version, label DP at the clients and optional user-level DP. Writes "
        "OUT/config.json, OUT/metrics.json and OUT/model.pt; an interrupted run resumes "
        "from OUT/checkpoint.pt when given the same command. Options: docs/FL_OPTIONS.md.",
    )
    p.add_argument("--out", required=True, help="the run folder")
    p.add_argument("--dataset", default="fashion-mnist", choices=sorted(DATASETS))
    p.add_argument("--seed", type=_number(int, 0), default=0, help="the run seed")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument(
        "--data-dir", default=None, metavar="DIR", help="where datasets are looked for first"
    )
    p.add_argument("--quiet", action="store_true", help="no progress display")
    p.add_argument(
        "--backend",
        choices=BACKENDS,
        default="local",
        help="who trains each server version's trips: local (this process) or ray (Ray "
        "actors, the optional extra labeldp[ray]; bit-identical to local at the same "
        "torch thread count per process)",
    )
    p.add_argument(
        "--actors", type=_number(int, 1), default=2, help="with --backend ray: actors (≥ 1)"
    )
    p.add_argument(
        "--cpus-per-actor",
        type=_number(int, 1),
        default=1,
        help="with --backend ray: CPUs (and torch threads) of each actor",
    )
    p.add_argument(
        "--address",
        default=None,
        metavar="ADDR",
        help="with --backend ray: the cluster to join ('auto' or HOST:PORT; default: start "
        "Ray on this machine)",
    )
    group = p.add_argument_group("federation options (docs/FL_OPTIONS.md)")
    for flag in flags([("fl", FederationOptions)]):
        parsing = flag.kind.argparse_options()
        if flag.metavar:
            parsing["metavar"] = flag.metavar
        group.add_argument(
            flag.flag, dest=f"fl_{flag.dest}", default=argparse.SUPPRESS, help=flag.help(),
            **parsing,
        )  # fmt: skip
    p.set_defaults(handler=_fl)


def _fl(args: argparse.Namespace) -> int:
    from .fl.options import FederationOptions
    from .fl.run import run_folder

    given = {k[3:]: v for k, v in vars(args).items() if k.startswith("fl_")}
    options = FederationOptions(**given)
    replay = None
    if args.backend == "ray":
        from .fl.ray_replay import RayReplay

        replay = RayReplay(args.actors, args.cpus_per_actor, args.address)
    else:
        _refuse_ray_flags({"--address": args.address is not None, "--actors": args.actors != 2,
                           "--cpus-per-actor": args.cpus_per_actor != 1})  # fmt: skip
    record = run_folder(options, args.seed, args.out, args.dataset, args.data_dir, args.device,
                        progress=not args.quiet, replay=replay)  # fmt: skip
    last = record.history[-1]
    print(
        f"{options.algorithm}: {record.evaluation_split} accuracy {100 * last['accuracy']:.2f} "
        f"% after "
        f"{last['server_steps']} server steps, {last['trips']} client trips, virtual time "
        f"{last['virtual_time']:.1f}; label ε {format_epsilon(record.label_epsilon)}"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="labeldp",
        description="labeldp: label differential privacy research toolkit. Train with a "
        "label-privacy method, audit what it leaks, and reproduce result tables.",
    )
    parser.add_argument("--version", action="version", version=f"labeldp {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_train_parser(sub)
    _add_recipes_parser(sub)
    _add_data_parser(sub)
    _add_attack_parser(sub)
    _add_account_parser(sub)
    _add_sweep_parsers(sub)
    _add_fl_parser(sub)
    return parser


def _after_disk_full(args: argparse.Namespace) -> str:
    """What to do once space is freed after a full disk stopped ``args.command``."""
    if args.command == "train":
        return (
            "free some space, then run the same command with --resume to continue from "
            "the last checkpoint"
        )
    if args.command in ("sweep", "reproduce"):
        return "free some space, then run the same command again: it continues where it stopped"
    return "free some space, then run the command again"


#: The longest error line printed (a longer message is cut, saying how much was cut).
MAX_ERROR_CHARS = 600
#: Exit status after SIGTERM (128 + 15, the shell's convention), and after Ctrl-C.
EXIT_SIGTERM, EXIT_INTERRUPT = 143, 130
#: errno values of a path that cannot be written: the line names it and what to do.
_PATH_ERRORS = (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR, errno.EEXIST)


def _one_line(message: object) -> str:
    """``message`` as one line of at most MAX_ERROR_CHARS characters."""
    text = " ".join(str(message).split())
    if len(text) > MAX_ERROR_CHARS:
        cut = len(text) - MAX_ERROR_CHARS
        text = f"{text[:MAX_ERROR_CHARS]}… ({cut} more characters)"
    return text


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, so that it stops like after Ctrl-C."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise _Terminated()


def _join_negative_lists(argv: list[str]) -> list[str]:
    """``--opt -0.5,1.5`` as ``--opt=-0.5,1.5``: argparse takes a value that starts with
    '-' and is not a plain number for an option, and then reports the option's value as
    missing; joined, the option's own check names what is wrong with the value."""
    out: list[str] = []
    for token in argv:
        if (
            out
            and out[-1].startswith("--")
            and "=" not in out[-1]
            and token.startswith("-")
            and "," in token
            and token[1:2] in set("0123456789.")
        ):
            out[-1] = f"{out[-1]}={token}"
        else:
            out.append(token)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    argv = _join_negative_lists(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(argv)
    previous = None
    try:  # SIGTERM (kill, a batch system's time limit) stops a run like Ctrl-C does
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread: leave signals alone
        pass
    try:
        return _run(args)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _run(args: argparse.Namespace) -> int:
    command = f"labeldp {args.command}"
    try:
        return args.handler(args)
    except ConfigError as exc:
        print(f"{command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except DataError as exc:
        print(f"{command}: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except sqlite3.DatabaseError as exc:  # OperationalError included
        store = getattr(args, "store", None) or "the results store"
        print(
            f"{command}: error: the results store {store} cannot be used "
            f"({_one_line(exc)}); check that it is a store labeldp wrote and that its disk "
            "has space, or pass another --store",
            file=sys.stderr,
        )
        return 1
    except (DiskFullError, OSError) as exc:
        if isinstance(exc, OSError) and exc.errno in _PATH_ERRORS and exc.filename:
            where = "choose another --out" if args.command == "train" else "choose another path"
            print(
                f"{command}: error: cannot write {exc.filename}: {exc.strerror}; "
                f"check its permissions, or {where}",
                file=sys.stderr,
            )
            return 1
        if isinstance(exc, OSError) and exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        what = exc if isinstance(exc, DiskFullError) else f"the disk is full: {exc}"
        print(f"{command}: error: {what}; {_after_disk_full(args)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        how = "terminated (SIGTERM)" if isinstance(exc, _Terminated) else "interrupted"
        print(
            f"{command}: {how}; finished epochs are checkpointed, "
            "run the same command with --resume to continue",
            file=sys.stderr,
        )
        return EXIT_SIGTERM if isinstance(exc, _Terminated) else EXIT_INTERRUPT


if __name__ == "__main__":
    sys.exit(main())
