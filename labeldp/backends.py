"""Where a sweep's runs execute: this process, a local process pool, or a Ray cluster.

Every backend is a :class:`concurrent.futures.Executor`; the sweep driver submits one task
per grid point, collects the results as they complete and alone writes the results store
(one writer, one transaction per row). A task never touches the store.

- ``local`` (the default, nothing to install): the runs one after another in this
  process (``workers`` 1) or in a pool of ``workers`` processes on this machine.
- ``ray`` (the optional extra ``pip install 'labeldp[ray]'``): each run is a Ray task
  asking for ``cpus_per_run`` CPUs (its torch thread count) and, when the runs train on
  CUDA, one GPU. ``address`` None starts a Ray instance inside this process (this machine
  only, ``num_cpus`` CPUs); "auto" or "HOST:PORT" joins a running cluster (``ray start
  --head`` on one node, ``ray start --address=HEAD:6379`` on the others).

Run folders on Ray (:class:`RayBackend` ``run_folders``):

- "shared": tasks write ``RUNS_DIR/<sweep>/<run>`` themselves, so RUNS_DIR must be the
  same path on every node (NFS, a cluster file system, or a single machine). Checkpoints
  survive a lost worker: the retried task resumes from them.
- "return": tasks train into a node-local scratch folder (``scratch_dir``, default
  ``<tmp>/labeldp-ray``) and return the finished folder's files (a tar archive); the
  driver unpacks it into RUNS_DIR before storing the row. No shared storage is needed; a
  retried task resumes only when it lands on the node holding its checkpoint.

The labeldp package (same version) and the datasets (``--data-dir``, or each node's own
download) must be present on every node.
"""

from __future__ import annotations

import collections
import ctypes
import io
import os
import shutil
import signal
import sys
import tarfile
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Executor, Future, ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from .errors import ConfigError, check_int

BACKENDS = ("local", "ray")
RUN_FOLDERS = ("shared", "return")

#: The Ray versions labeldp is tested with (pyproject's ``ray`` extra).
RAY_REQUIREMENT = "ray>=2.40,<3"


def import_ray() -> Any:
    """The ``ray`` module, or a ConfigError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ConfigError(
            "the ray backend needs Ray, an optional extra: pip install 'labeldp[ray]' "
            f"({RAY_REQUIREMENT})"
        ) from None
    return ray


class SerialExecutor(Executor):
    """Runs each submitted call at once, in this process (``workers`` = 1)."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller via the future
            future.set_exception(exc)
        return future


@dataclass(frozen=True)
class LocalBackend:
    """This machine: ``workers`` ≥ 1 runs at once (1: in this process)."""

    workers: int = 1

    def __post_init__(self) -> None:
        check_int("workers", self.workers, 1)

    @property
    def parallel(self) -> bool:
        """Whether several runs go at once (their progress bars are then off)."""
        return self.workers > 1

    def capacity(self, runs: int) -> int:
        """Runs in flight at once out of ``runs``: the workers."""
        return self.workers

    @property
    def threads(self) -> int | None:
        """Torch threads per run: an equal share of the CPUs with several workers, None
        (torch's default) with one."""
        if self.workers == 1:
            return None
        return max(1, (os.cpu_count() or 1) // self.workers)

    def executor(self, device: str | None = None) -> Executor:
        """This process (one worker) or a pool of worker processes that die with it
        (``device`` is the runs' own business here)."""
        if self.workers == 1:
            return SerialExecutor()
        return ProcessPoolExecutor(
            self.workers,
            mp_context=get_context("spawn"),
            initializer=_worker_init,
            initargs=(os.getpid(),),
        )


def _worker_init(parent: int) -> None:
    """Ties a sweep worker's life to the sweep process ``parent``: the kernel kills the
    worker when its parent dies (Linux ``PR_SET_PDEATHSIG``), and a watcher thread does
    the same wherever the parent's pid changes (the fallback, e.g. off Linux). Otherwise a
    ``kill -9`` of the sweep would leave workers training grid points whose results
    nothing stores. (The death signal follows the thread that started the worker; the
    pool starts its workers from the thread that submits, the sweep's main thread.)"""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # the parent died before the line above
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()


_PR_SET_PDEATHSIG = 1


def _watch_parent(parent: int, every: float = 0.5) -> None:
    while os.getppid() == parent:
        time.sleep(every)
    os.kill(os.getpid(), signal.SIGKILL)


@dataclass(frozen=True)
class RayBackend:
    """A Ray cluster; see the module docstring.

    address: None (start Ray inside this process), "auto" or "HOST:PORT" of a running
    cluster. num_cpus: CPUs of the Ray instance started here (None: all; ignored with an
    address). cpus_per_run: CPUs each run asks for, and its torch thread count (≥ 1).
    gpus_per_run: GPUs each run asks for (≥ 0; None: 1 when the runs train on CUDA, else
    0). run_folders: "shared" or "return". scratch_dir: node-local folder of "return"
    mode. max_retries: how often Ray retries a task whose worker died (≥ 0).
    """

    address: str | None = None
    num_cpus: int | None = None
    cpus_per_run: int = 1
    gpus_per_run: float | None = None
    run_folders: str = "shared"
    scratch_dir: str | None = None
    max_retries: int = 3

    def __post_init__(self) -> None:
        check_int("cpus_per_run", self.cpus_per_run, 1)
        if self.num_cpus is not None:
            check_int("num_cpus", self.num_cpus, 1)
        check_int("max_retries", self.max_retries, 0)
        if self.gpus_per_run is not None and not (
            isinstance(self.gpus_per_run, (int, float)) and 0 <= self.gpus_per_run
        ):
            raise ConfigError(f"gpus_per_run must be a number ≥ 0, got {self.gpus_per_run!r}")
        if self.run_folders not in RUN_FOLDERS:
            raise ConfigError(
                f"run_folders must be one of {', '.join(RUN_FOLDERS)}, got {self.run_folders!r}"
            )

    #: Every run is in flight at once: Ray queues what the cluster cannot start yet.
    parallel = True

    def capacity(self, runs: int) -> int:
        return runs

    @property
    def threads(self) -> int:
        return self.cpus_per_run

    def gpus(self, device: str | None) -> float:
        """GPUs per run for runs on ``device`` ("auto": 1 when the cluster has any)."""
        if self.gpus_per_run is not None:
            return float(self.gpus_per_run)
        if device is not None and device.startswith("cuda"):
            return 1.0
        if device in (None, "auto"):
            ray = import_ray()
            return 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
        return 0.0

    def executor(self, device: str | None = "auto") -> RayExecutor:
        return RayExecutor(self, device)


class RayExecutor(Executor):
    """Submits calls as Ray tasks with the backend's resource requests; each returns a
    concurrent.futures.Future. Starts Ray when it is not running (and stops what it
    started at :meth:`shutdown`)."""

    def __init__(self, backend: RayBackend, device: str | None = "auto") -> None:
        ray = import_ray()
        self.backend = backend
        self._started = False
        if not ray.is_initialized():
            ray.init(
                address=backend.address,
                num_cpus=backend.num_cpus if backend.address is None else None,
                include_dashboard=False,
                log_to_driver=False,
                configure_logging=False,
            )
            self._started = True
        if device is not None and device.startswith("cuda:"):
            self.shutdown()
            raise ConfigError(
                f"device {device!r}: a Ray task sees only the GPU Ray gives it; use --device "
                "cuda (or auto) with --backend ray"
            )
        self._gpus = backend.gpus(device)
        self._remote: dict[Callable[..., Any], Any] = {}
        try:
            check_resources(backend.cpus_per_run, self._gpus)
        except ConfigError:
            self.shutdown()
            raise

    def _options(self, fn: Callable[..., Any], **extra: Any) -> Any:
        ray = import_ray()
        if fn not in self._remote:
            self._remote[fn] = ray.remote(fn)
        return self._remote[fn].options(
            num_cpus=self.backend.cpus_per_run,
            num_gpus=self._gpus,
            max_retries=self.backend.max_retries,
            **extra,
        )

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        return self._options(fn).remote(*args, **kwargs).future()

    def submit_on(self, node: str | None, fn: Callable[..., Any], /, *args: Any) -> Future:
        """Like :meth:`submit`, preferring the node ``node`` (a Ray node id; None: any),
        e.g. where a run left files a later run reads. Runs elsewhere if that node is gone."""
        if node is None:
            return self.submit(fn, *args)
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        strategy = NodeAffinitySchedulingStrategy(node_id=node, soft=True)
        return self._options(fn, scheduling_strategy=strategy).remote(*args).future()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        if self._started:
            import_ray().shutdown()
            self._started = False


def check_resources(cpus: float, gpus: float, copies: int = 1) -> None:
    """ConfigError when no node of the running Ray cluster has ``cpus`` CPUs and ``gpus``
    GPUs for one task (or, for ``copies`` > 1 actors, when the cluster has fewer in all):
    Ray would keep such work pending for ever."""
    ray = import_ray()
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    fits = [n for n in nodes if n.get("CPU", 0) >= cpus and n.get("GPU", 0) >= gpus]
    if not fits:
        most = max((n.get("CPU", 0) for n in nodes), default=0)
        gpu = max((n.get("GPU", 0) for n in nodes), default=0)
        raise ConfigError(
            f"no node of the Ray cluster has {cpus:g} CPUs and {gpus:g} GPUs for one task "
            f"(the largest: {most:g} CPUs, {gpu:g} GPUs); lower --cpus-per-run, or run on "
            "another device"
        )
    total = sum(n.get("CPU", 0) for n in nodes)
    if copies * cpus > total:
        raise ConfigError(
            f"{copies} actors of {cpus:g} CPUs need {copies * cpus:g} CPUs; the Ray cluster "
            f"has {total:g}: lower --actors or --cpus-per-actor"
        )


def current_node() -> str | None:
    """The Ray node id this code runs on, or None outside a Ray worker."""
    try:
        import ray
    except ImportError:
        return None
    if not ray.is_initialized():
        return None
    return ray.get_runtime_context().get_node_id()


def scratch_root(scratch_dir: str | None) -> Path:
    """The node-local folder of "return" mode (created)."""
    root = Path(scratch_dir) if scratch_dir else Path(tempfile.gettempdir()) / "labeldp-ray"
    root.mkdir(parents=True, exist_ok=True)
    return root


def pack_folder(folder: str | Path) -> bytes:
    """The files under ``folder`` as an uncompressed tar archive (paths relative to it)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        archive.add(str(folder), arcname=".")
    return buffer.getvalue()


def unpack_folder(data: bytes, dest: str | Path) -> None:
    """Writes the archive of :func:`pack_folder` as folder ``dest``, atomically: unpacked
    next to it, then renamed into place (an existing ``dest`` is replaced). Refuses
    members that would land outside ``dest``."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = dest.parent / f".{dest.name}.{uuid.uuid4().hex}.partial"
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r") as archive:
            archive.extractall(staging, filter="data")
        if dest.exists():
            old = dest.parent / f".{dest.name}.{uuid.uuid4().hex}.old"
            dest.rename(old)
            staging.rename(dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(dest)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def drive(
    executor: Executor,
    items: list[Any],
    task: Callable[..., Any],
    arguments: Callable[[Any], tuple[Any, ...]],
    finish: Callable[[Any], None],
    capacity: int,
    group: Callable[[Any], str | None] = lambda item: None,
) -> None:
    """Runs ``task(*arguments(item))`` for every item on ``executor`` and calls
    ``finish(result)`` in this process as each completes (the driver's one place to write
    results). At most ``capacity`` ≥ 1 tasks are in flight. Items of one ``group`` (not
    None) start after the group's first item has finished, on the node that ran it when
    the executor can place tasks (``submit_on``) and the result names its ``node``. An
    exception in a task propagates, after the other tasks already finished have been
    handed to ``finish``; the executor is shut down on the way out."""
    followers: dict[str, list[Any]] = {}
    ready: collections.deque = collections.deque()
    for item in items:
        key = group(item)
        if key is None or key not in followers:
            ready.append((item, None))
            if key is not None:
                followers[key] = []
        else:
            followers[key].append(item)
    place = getattr(executor, "submit_on", None)
    pending: dict[Future, str | None] = {}
    try:
        while ready or pending:
            while ready and len(pending) < capacity:
                item, node = ready.popleft()
                args = arguments(item)
                future = place(node, task, *args) if place else executor.submit(task, *args)
                pending[future] = group(item)
            done = next(as_completed(pending))
            key = pending.pop(done)
            if done.exception() is not None:
                # store every other run that has finished before giving up
                for other in [f for f in pending if f.done() and f.exception() is None]:
                    pending.pop(other)
                    finish(other.result())
                raise done.exception()
            result = done.result()
            finish(result)
            if key is not None:
                node = getattr(result, "node", None)
                ready.extend((item, node) for item in followers.pop(key, []))
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
