"""Client trips: local SGD from the downloaded model, every trip of one version at once.

A trip starts from the server's weights at the version it downloaded, runs local SGD on
the client's own examples and returns its update Δ = x_start − x_end (a flat float32
vector over the model's parameters, in ``named_parameters`` order).

Local training (:class:`LocalTraining`): ``epochs`` passes over the client's examples,
each a fresh random permutation cut into batches of ``batch_size`` (the last one smaller),
or exactly ``steps`` such batches (permutations repeated as needed); plain cross-entropy
(or the targets' own loss) averaged over the batch; SGD at a constant local learning rate
with optional momentum and weight decay. No augmentation: a trip's randomness is only its
batch order, drawn from its own generator (seeded from the run seed and the trip's number),
so a trip trains the same whichever other trips it is batched with.

Vectorized (:func:`train_trips`): the n trips that downloaded the same version start from
the same weights, so they train as n stacked models (:class:`~labeldp.train.ensemble.
StackedModels`, one vmap'd forward over (n, B, ...) inputs) through the training core's
loop body (:func:`~labeldp.train.core.train_steps`). Each client's loss is its own masked
batch mean (padding of a short last batch masked out) and the total is their sum, so each
client's gradient is the one it would get alone. Ragged step counts (clients of different
sizes): the trips run together for as many steps as the shortest has, the finished ones
leave the stack (their weights kept, the others' parameters and momentum carried over),
and the rest go on: no step is wasted and nothing is masked inside the optimizer.
:func:`train_trips_loop` trains the same trips one client after another (an ``nn.Module``
and its own optimizer each): the reference in the tests and the peer in the benchmark.

Models must have no batch statistics (BatchNorm): use GroupNorm or no normalization.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError, check_int
from ..train.config import SGDConfig
from ..train.core import Optimization, train_steps
from ..train.ensemble import StackedModels
from ..train.steps import BackpropStep, GradientStep, StepOutput
from ..train.targets import TargetFn


@dataclass(frozen=True)
class LocalTraining:
    """What a client does on one trip.

    lr: local learning rate η_l (> 0, constant over the trip). batch_size: B (≥ 1).
    epochs: local passes over the client's examples (≥ 1); ignored when ``steps`` is set.
    steps: exactly this many local steps Q (≥ 1) instead of epochs. momentum: local SGD
    momentum in [0, 1) (0: plain local SGD, as FedBuff's clients). weight_decay: ≥ 0.
    """

    lr: float = 0.05
    batch_size: int = 10
    epochs: int = 1
    steps: int | None = None
    momentum: float = 0.0
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        check_int("batch_size", self.batch_size, 1)
        check_int("epochs", self.epochs, 1)
        if self.steps is not None:
            check_int("steps", self.steps, 1)
        _ = self.sgd  # validates lr, momentum, weight decay

    @property
    def sgd(self) -> SGDConfig:
        return SGDConfig(
            lr=self.lr, momentum=self.momentum, nesterov=False,
            weight_decay=self.weight_decay, schedule="constant",
        )  # fmt: skip

    def num_steps(self, size: int) -> int:
        """Local steps of a client holding ``size`` examples."""
        if self.steps is not None:
            return self.steps
        return self.epochs * math.ceil(size / self.batch_size)


def trip_batches(size: int, local: LocalTraining, generator: torch.Generator) -> list[torch.Tensor]:
    """One trip's batches: positions 0..size−1 into the client's examples, one tensor per
    local step (consecutive random permutations cut into batches of B; the last batch of
    each permutation may be shorter). Draws only from ``generator``."""
    check_int("size", size, 1)
    b = local.batch_size
    steps = local.num_steps(size)
    batches: list[torch.Tensor] = []
    while len(batches) < steps:
        perm = torch.randperm(size, generator=generator)
        batches.extend(perm[i : i + b] for i in range(0, size, b))
    return batches[:steps]


@dataclass
class _Padded:
    """Batches of n trips as (n, B) dataset indices with a 0/1 mask (n, B), per step."""

    indices: torch.Tensor  # (S, n, B) int64
    mask: torch.Tensor  # (S, n, B) float32
    steps: torch.Tensor  # (n,) int64: each trip's own number of steps


def _pad(examples: Sequence[torch.Tensor], batches: Sequence[list[torch.Tensor]], b: int):
    n, s = len(batches), max(len(x) for x in batches)
    indices = torch.zeros(s, n, b, dtype=torch.int64)
    mask = torch.zeros(s, n, b)
    for i, (own, trip) in enumerate(zip(examples, batches, strict=True)):
        indices[:, i, :] = own[0]  # padding points at a real example of the client
        for t, batch in enumerate(trip):
            indices[t, i, : len(batch)] = own[batch]
            mask[t, i, : len(batch)] = 1.0
    return _Padded(indices, mask, torch.tensor([len(x) for x in batches]))


class _StepBatches:
    """The batch sampler of one segment: step t gives ((n, B) indices, (n, B) mask)."""

    def __init__(self, padded: _Padded, rows: torch.Tensor, first: int, device) -> None:
        self.padded, self.rows, self.first, self.device = padded, rows, first, device

    def batches(self, num_examples: int, generator: torch.Generator):
        t = self.first
        while True:
            yield (
                self.padded.indices[t, self.rows].to(self.device),
                self.padded.mask[t, self.rows].to(self.device),
            )
            t += 1


class _FixedBatches:
    """A batch sampler that yields the given batches, in order."""

    def __init__(self, batches: list[torch.Tensor]) -> None:
        self.fixed = batches

    def batches(self, num_examples: int, generator: torch.Generator):
        yield from self.fixed


class ClientStep(GradientStep):
    """The gradient of n stacked clients: each client's masked mean loss over its batch,
    summed over clients (so each client's gradient is the one it would get alone)."""

    def __call__(self, model, inputs, indices, targets: TargetFn, autocast) -> StepOutput:
        idx, mask = indices
        n, b = idx.shape
        with autocast():
            logits = model(inputs)  # (n, B, K)
        flat = logits.reshape(n * b, -1)
        batch_targets = targets(idx.flatten(), flat.detach() if targets.uses_logits else None)
        per_example = targets.loss(flat.float(), batch_targets, reduction="none").view(n, b)
        per_client = (per_example * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        loss = per_client.sum()
        loss.backward()
        return StepOutput(loss.detach() / n, flat.detach(), batch_targets)


def _stacked_inputs(normalize):
    def inputs(images: torch.Tensor, indices, generator: torch.Generator) -> torch.Tensor:
        idx, _ = indices
        x = normalize(images[idx.flatten()])
        return x.view(*idx.shape, *x.shape[1:])

    return inputs


def flat_parameters(params: dict[str, torch.Tensor], rows: bool = False) -> torch.Tensor:
    """Parameters as one flat vector (or (n, P) for stacked ones, ``rows=True``), in the
    dictionary's order (a module's ``named_parameters`` order)."""
    if rows:
        return torch.cat([v.detach().reshape(v.shape[0], -1) for v in params.values()], 1)
    return torch.cat([v.detach().reshape(-1) for v in params.values()])


def unflatten(flat: torch.Tensor, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A flat vector back into tensors shaped as ``like`` (same order)."""
    out, start = {}, 0
    for k, v in like.items():
        out[k] = flat[start : start + v.numel()].view_as(v)
        start += v.numel()
    if start != flat.numel():
        raise ConfigError(f"a flat vector of {flat.numel()} values for {start} parameters")
    return out


def train_trips(
    model: nn.Module,
    start: dict[str, torch.Tensor],
    images: torch.Tensor,
    targets: TargetFn,
    examples: Sequence[torch.Tensor],
    generators: Sequence[torch.Generator],
    local: LocalTraining,
    normalize,
    forward: str = "auto",
) -> torch.Tensor:
    """The updates Δ = x_start − x_end, (n, P) float32, of n trips that all start from
    ``start`` (the server's parameters by name), trained together.

    model: the architecture (its own weights are not used). images: uint8 (N, C, H, W) on
    the device. targets: the labels the clients train on (their privatized ones), read by
    dataset index. examples: each trip's client's dataset indices (int64, non-empty).
    generators: one per trip, its batch order. normalize: uint8 images → model inputs.
    forward: StackedModels' strategy ("auto", "vmap", "grouped" or "loop").
    """
    n = len(examples)
    if n == 0:
        return torch.zeros(0, sum(v.numel() for v in start.values()))
    if len(generators) != n:
        raise ConfigError(f"{len(generators)} generators for {n} trips")
    batches = [trip_batches(len(e), local, g) for e, g in zip(examples, generators, strict=True)]
    padded = _pad(examples, batches, local.batch_size)
    device = images.device
    stack = StackedModels.replicate(model, n, forward=forward, params=start)
    x_start = flat_parameters(start).to(device)
    out = torch.empty(n, x_start.numel(), device=device)
    rows = torch.arange(n)  # which trips the stack holds, in order
    momentum: list[torch.Tensor] | None = None
    done = 0
    step = ClientStep()
    inputs = _stacked_inputs(normalize)
    generator = torch.Generator(device=device)  # unused: the batches are precomputed
    while len(rows):
        remaining = padded.steps[rows]
        until = int(remaining.min())
        optimization = Optimization(local.sgd, list(stack.params.values()), until)
        if momentum is not None:
            for p, buf in zip(stack.params.values(), momentum, strict=True):
                optimization.optimizer.state[p]["momentum_buffer"] = buf
        train_steps(
            stack, images, targets, range(done, until), step,
            _StepBatches(padded, rows, done, device), generator,
            optimization=optimization, inputs=inputs,
        )  # fmt: skip
        finished = remaining == until
        ends = flat_parameters(stack.params, rows=True)
        out[rows[finished]] = x_start - ends[finished.to(device)]
        keep = torch.nonzero(~finished).flatten()
        if len(keep) and local.momentum > 0:
            momentum = [
                optimization.optimizer.state[p]["momentum_buffer"][keep.to(device)].clone()
                for p in stack.params.values()
            ]
        if len(keep):
            stack = stack.subset(keep.to(device))
        rows, done = rows[keep], until
    return out


def train_trips_loop(
    model: nn.Module,
    start: dict[str, torch.Tensor],
    images: torch.Tensor,
    targets: TargetFn,
    examples: Sequence[torch.Tensor],
    generators: Sequence[torch.Generator],
    local: LocalTraining,
    normalize,
) -> torch.Tensor:
    """The same updates as :func:`train_trips`, one client after another: each trip an
    ``nn.Module`` with its own optimizer, through the core's loop body with the plain
    :class:`~labeldp.train.steps.BackpropStep` (the reference and the benchmark's peer)."""
    device = images.device
    x_start = flat_parameters(start).to(device)
    out = torch.empty(len(examples), x_start.numel(), device=device)
    for i, (own, g) in enumerate(zip(examples, generators, strict=True)):
        batches = [own[b].to(device) for b in trip_batches(len(own), local, g)]
        client = copy.deepcopy(model).to(device)
        with torch.no_grad():
            for k, p in client.named_parameters():
                p.copy_(start[k])
        client.train()

        optimization = Optimization(local.sgd, list(client.parameters()), len(batches))
        train_steps(
            client, images, targets, range(len(batches)), BackpropStep(), _FixedBatches(batches),
            torch.Generator(device=device), optimization=optimization,
            inputs=lambda data, idx, gen: normalize(data[idx]),
        )  # fmt: skip
        out[i] = x_start - flat_parameters(dict(client.named_parameters()))
    return out
