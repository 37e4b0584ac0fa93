"""Many small models trained at once: stacked parameters, one vmap'd forward pass.

PATE trains hundreds of teachers of one architecture on disjoint label sets. Training them
one after another repeats the same small kernels hundreds of times; here the n teachers'
parameters are stacked along a new leading dimension (``torch.func.stack_module_state``)
and one ``vmap`` of a functional call runs all of them on their own inputs (n, B, ...).
Each teacher's loss is a mean over its own batch and the total is their sum, so each
teacher's gradient is exactly the one it would get alone; SGD (momentum, Nesterov, weight
decay) and the EMA act elementwise, so they too are per-teacher.

:func:`train_fixmatch_ensemble` is FixMatch (see :mod:`labeldp.train.fixmatch`) for such
an ensemble: each step every teacher draws B labeled examples from its own part (uniformly
with replacement) and μ·B unlabeled images from all images. Models must be free of batch
statistics (BatchNorm would need per-teacher running statistics under vmap). It runs the
training core's loop body (:func:`~labeldp.train.core.train_steps`, as the
:class:`~labeldp.train.Trainer` does) with the optimizer of the one
:class:`~labeldp.train.config.SGDConfig` and the shared checkpoint helper; only its
sampler (:class:`PartBatches`), inputs (:func:`fixmatch_views`), gradient
(:class:`EnsembleFixMatchStep`), weight average
(:class:`~labeldp.train.ema.StackedWeightAverage`) and per-step seeding are its own.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state, vmap
from tqdm.auto import tqdm

from ..augment import Normalize
from ..errors import ConfigError, check_int
from ..models.norm import has_batch_statistics
from ..seeding import Stream, derive_seed
from .checkpoint import CHECKPOINT_FORMAT, load_checkpoint, save_checkpoint
from .config import SGDConfig
from .core import Optimization, train_steps
from .ema import StackedWeightAverage
from .fixmatch import Augmentation, pseudo_label_losses
from .grouped_forward import GroupedForward, grouped_forward
from .steps import GradientStep, StepOutput
from .targets import HardLabels


def _fast_layout(x: torch.Tensor) -> torch.Tensor:
    """A 4-D tensor (images, convolution weights) in channels-last layout, as the training
    core keeps them: convolutions then return channels-last outputs (with one input
    channel only the weights' layout decides), and on CPU e.g. a stride-1 max-pool runs
    ~8x faster on those than on the contiguous layout."""
    # clone, not contiguous(): with one channel a contiguous tensor already counts as
    # channels-last, and the convolution would still see the contiguous strides.
    return x.clone(memory_format=torch.channels_last) if x.dim() == 4 else x


#: How a stack's forward pass runs (see :class:`StackedModels`).
FORWARDS = ("auto", "vmap", "grouped", "loop")


class StackedModels:
    """n models of one architecture, parameters and buffers stacked along dim 0.

    ``self(x)`` with x of shape (n, B, ...) returns (n, B, K): model i on x[i].

    forward: how the n forward passes run; all give the same values and per-model
    gradients. "vmap": one vmap'd call (one kernel per layer for all models; what pays on
    a GPU, where n small kernels cost n launches). "grouped": the n models as one model
    with n-fold grouped layers, run channels-last (:mod:`labeldp.train.grouped_forward`;
    convolutions, linear layers, pooling, GroupNorm and activations only); on a CPU ~2x
    faster than vmap, whose activations stay in the layout where max-pooling is slow.
    "loop": model by model on views of the stacked parameters (``unbind``), any
    architecture. Everything else (sampling, augmentation, optimizer, EMA) stays batched
    over the models. "auto": "vmap" on CUDA; on CPU the architecture's own choice, its
    class attribute ``cpu_stack_forward`` ("grouped" for the tanh CNN, whose stride-1
    max-pools gain most; the small CNN's wider 3x3 convolutions run slower grouped than
    one by one), else "loop", and "loop" for a stack of one model
    (experiments/perf/fl_clients_vectorized_vs_loop.py). The choice is fixed by the
    architecture and the stack's size, never by timing, so runs stay deterministic.
    """

    def __init__(self, models: Sequence[nn.Module], forward: str = "auto") -> None:
        if not models:
            raise ConfigError("an ensemble needs at least one model")
        if forward not in FORWARDS:
            raise ConfigError(f"forward must be one of {', '.join(FORWARDS)}, got {forward!r}")
        if any(has_batch_statistics(m) for m in models):
            raise ConfigError(
                "ensemble models must not have BatchNorm (use norm='group'): vmap over "
                "teachers cannot keep per-teacher running statistics"
            )
        params, buffers = stack_module_state(list(models))
        self.params = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
        self.buffers = {k: v.detach().clone() for k, v in buffers.items()}
        self.base = copy.deepcopy(models[0]).to("meta")
        self.size = len(models)
        self.forward = forward
        self._grouped = None
        if forward == "grouped":
            self._grouped = grouped_forward(self.base) or GroupedForward(self.base)  # raises
        elif forward == "auto" and getattr(models[0], "cpu_stack_forward", "loop") == "grouped":
            self._grouped = grouped_forward(self.base)

    def __call__(self, x: torch.Tensor, params: dict[str, torch.Tensor] | None = None):
        params = params or self.params
        strategy = self.forward
        if strategy == "auto":
            if x.device.type == "cuda":
                strategy = "vmap"
            else:  # one model alone gains nothing from grouping (FedAsync's trips)
                strategy = "grouped" if self._grouped and self.size > 1 else "loop"
        if strategy == "grouped":
            return self._grouped(params, x)
        if strategy == "loop":
            p_rows = {k: [_fast_layout(r) for r in v.unbind(0)] for k, v in params.items()}
            b_rows = {k: v.unbind(0) for k, v in self.buffers.items()}
            return torch.stack(
                [
                    functional_call(
                        self.base,
                        (
                            {k: v[i] for k, v in p_rows.items()},
                            {k: v[i] for k, v in b_rows.items()},
                        ),
                        (_fast_layout(x[i]),),
                    )
                    for i in range(self.size)
                ]
            )

        def one(p, b, xi):
            return functional_call(self.base, (p, b), (xi,))

        return vmap(one, randomness="different")(params, self.buffers, x)

    @classmethod
    def replicate(
        cls,
        model: nn.Module,
        n: int,
        forward: str = "auto",
        params: dict[str, torch.Tensor] | None = None,
    ) -> StackedModels:
        """n copies of ``model`` (with ``params`` instead of its own parameters when given,
        e.g. a federated server's weights), stacked without building n modules."""
        check_int("n", n, 1)
        stacked = cls.__new__(cls)
        cls.__init__(stacked, [model], forward)  # the checks, base and buffers of one
        source = params if params is not None else dict(model.named_parameters())
        stacked.params = {
            k: source[k].detach().unsqueeze(0).repeat(n, *([1] * source[k].dim()))
            for k in stacked.params
        }
        for v in stacked.params.values():
            v.requires_grad_(True)
        stacked.buffers = {k: v.expand(n, *v.shape[1:]).clone() for k, v in stacked.buffers.items()}
        stacked.size = n
        return stacked

    def subset(self, rows: torch.Tensor) -> StackedModels:
        """The models in ``rows`` (an index tensor) as a new stack, parameters copied."""
        stacked = copy.copy(self)
        stacked.params = {
            k: v.detach()[rows].clone().requires_grad_(True) for k, v in self.params.items()
        }
        stacked.buffers = {k: v[rows].clone() for k, v in self.buffers.items()}
        stacked.size = len(rows)
        return stacked

    def model(self, i: int, params: dict[str, torch.Tensor] | None = None) -> nn.Module:
        """Model ``i`` as an ordinary module (a copy, on the parameters' device)."""
        params = params or self.params
        module = copy.deepcopy(self.base).to_empty(device=next(iter(params.values())).device)
        state = {k: v[i].detach().clone() for k, v in params.items()}
        state |= {k: v[i].clone() for k, v in self.buffers.items()}
        module.load_state_dict(state)
        return module


@dataclass(frozen=True)
class EnsembleFixMatchConfig:
    """FixMatch hyper-parameters for an ensemble (the spec's values as defaults, except
    the step count, which depends on the budget).

    steps: optimizer steps per teacher (≥ 1). batch_size: labeled examples per teacher and
    step (≥ 1). mu: unlabeled per labeled (≥ 1). threshold: τ in (0, 1]. lambda_u ≥ 0.
    lr, momentum, nesterov, weight_decay: SGD, as :attr:`sgd`; schedule: "fixmatch" (the
    spec's and the FixMatch paper's cosine, lr·cos(7π·k / (16·steps)) at step k, ending
    at cos(7π/16)·lr), "cosine" (to 0) or "constant" (see
    :func:`labeldp.train.schedule.learning_rate`). ema_decay: in (0, 1), warmed up as
    :func:`labeldp.train.ema.decay_at`. seed ≥ 0.
    checkpoint_every: steps between checkpoints (≥ 1).
    """

    steps: int
    batch_size: int = 16
    mu: int = 7
    threshold: float = 0.95
    lambda_u: float = 1.0
    lr: float = 0.03
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "fixmatch"
    ema_decay: float = 0.999
    seed: int = 0
    checkpoint_every: int = 200

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "mu", "checkpoint_every"):
            check_int(name, getattr(self, name), 1)
        check_int("seed", self.seed, 0)
        if not 0 < self.threshold <= 1:
            raise ConfigError(f"threshold must be in (0, 1], got {self.threshold}")
        if not 0 < self.ema_decay < 1:
            raise ConfigError(f"ema_decay must be in (0, 1), got {self.ema_decay}")
        if self.schedule not in ("fixmatch", "cosine", "constant"):
            raise ConfigError(
                f"schedule must be fixmatch, cosine or constant, got {self.schedule!r}"
            )
        if not self.lr > 0 or not self.lambda_u >= 0 or not self.weight_decay >= 0:
            raise ConfigError("lr must be > 0, lambda_u and weight_decay ≥ 0")
        _ = self.sgd  # validates momentum and nesterov too

    @property
    def sgd(self) -> SGDConfig:
        """The teachers' optimizer and schedule (no warm-up), as the training core's
        one optimizer configuration; derived, so that ``repr`` and ``asdict`` of this
        configuration (the checkpoint's and the stored votes' identity) stay as they
        were."""
        return SGDConfig(
            lr=self.lr,
            momentum=self.momentum,
            nesterov=self.nesterov,
            weight_decay=self.weight_decay,
            schedule=self.schedule,
            warmup_fraction=0.0,
        )


def _padded(parts: Sequence[torch.Tensor], device: torch.device):
    sizes = torch.tensor([len(p) for p in parts], device=device)
    if int(sizes.min()) < 1:
        raise ConfigError("every teacher needs at least one labeled example")
    table = torch.zeros(len(parts), int(sizes.max()), dtype=torch.int64, device=device)
    for i, part in enumerate(parts):
        table[i, : len(part)] = part.to(device)
    return table, sizes


class PartBatches:
    """The batch sampler of n stacked models, model i on its own part ``parts[i]`` (index
    tensors into the data, each non-empty): every step each model draws ``batch_size``
    indices uniformly with replacement from its part, as an (n, B) int64 tensor; with
    ``unlabeled`` > 0 it also draws that many indices uniformly from all N examples (n, U)
    (FixMatch's unlabeled images), and each batch is the pair (labeled, unlabeled).
    Draws, in this order, from the generator of :meth:`batches`, on ``device``; the
    batches never end (the loop takes as many as it runs steps).
    """

    def __init__(
        self,
        parts: Sequence[torch.Tensor],
        batch_size: int,
        device: torch.device,
        unlabeled: int = 0,
    ) -> None:
        check_int("batch_size", batch_size, 1)
        check_int("unlabeled", unlabeled, 0)
        self.table, self.sizes = _padded(parts, device)
        self.batch_size = batch_size
        self.unlabeled = unlabeled
        self.device = device

    def steps_per_epoch(self, num_examples: int) -> int:
        """Steps in which the largest part is drawn once, in expectation."""
        return -(-int(self.sizes.max()) // self.batch_size)

    def batches(self, num_examples: int, generator: torch.Generator):
        n, b, u = len(self.sizes), self.batch_size, self.unlabeled
        while True:
            pos = torch.rand(n, b, generator=generator, device=self.device) * self.sizes[:, None]
            labeled = self.table.gather(1, pos.long())  # (n, B) dataset indices
            if not u:
                yield labeled
                continue
            yield (
                labeled,
                torch.randint(0, num_examples, (n, u), generator=generator, device=self.device),
            )


def fixmatch_views(normalize: Normalize, weak: Augmentation, strong: Augmentation):
    """The inputs of a FixMatch ensemble step (an :data:`~labeldp.train.core.InputFn`):
    for (labeled (n, B), unlabeled (n, U)) indices, the normalized weak views of the
    labeled images, then the weak and the strong views of the unlabeled ones, augmented
    in that order with the generator: (n, B + 2U, C, H, W)."""

    def inputs(images: torch.Tensor, indices, generator: torch.Generator) -> torch.Tensor:
        labeled, unlabeled = indices
        n = labeled.shape[0]

        def view(idx: torch.Tensor, augment: Augmentation) -> torch.Tensor:
            x = normalize(augment(images[idx.flatten()], generator))
            return x.view(n, idx.shape[1], *x.shape[1:])

        return torch.cat([view(labeled, weak), view(unlabeled, weak), view(unlabeled, strong)], 1)

    return inputs


class EnsembleFixMatchStep(GradientStep):
    """FixMatch's gradient for stacked models (a
    :class:`~labeldp.train.steps.GradientStep` of :func:`~labeldp.train.core.train_steps`
    on :class:`StackedModels`), on the inputs of :func:`fixmatch_views`: each model's loss
    is the mean cross-entropy of its B labeled examples plus ``lambda_u`` times the mean
    over its U unlabeled examples of the confident pseudo-label loss
    (:func:`~labeldp.train.fixmatch.pseudo_label_losses`, threshold τ); the total is their
    sum, so each model's gradient is the one it would get alone.

    threshold: τ in (0, 1]. lambda_u ≥ 0. Its targets: hard labels of the dataset
    (``targets(indices, None)`` gives the labels of the labeled indices).
    """

    def __init__(self, threshold: float, lambda_u: float) -> None:
        self.threshold = threshold
        self.lambda_u = lambda_u

    def __call__(self, model, inputs, indices, targets, autocast) -> StepOutput:
        labeled, unlabeled = indices
        n, b, u = labeled.shape[0], labeled.shape[1], unlabeled.shape[1]
        with autocast():
            logits = model(inputs)  # (n, B + 2U, K)
        k = logits.shape[-1]
        labels = targets(labeled.flatten(), None)
        supervised = F.cross_entropy(logits[:, :b].reshape(-1, k), labels, reduction="none")
        weak_logits, strong_logits = logits[:, b : b + u], logits[:, b + u :]
        per_u, _ = pseudo_label_losses(weak_logits, strong_logits, self.threshold)
        loss = supervised.view(n, b).mean(1).sum() + self.lambda_u * per_u.mean(1).sum()
        loss.backward()
        return StepOutput(loss.detach(), logits[:, :b].detach(), labels.view(n, b))


def _ensemble_fingerprint(config: EnsembleFixMatchConfig, teachers: int) -> dict[str, object]:
    return {"config": repr(config), "teachers": teachers}


def _legacy_checkpoint(state: dict) -> dict:
    """A checkpoint written before the shared checkpoint helper (its identity under
    ``config`` and ``teachers``, no ``fingerprint``), in the current layout."""
    if "fingerprint" in state or "config" not in state:
        return state
    state = dict(state)
    config, teachers = state.pop("config"), state.pop("teachers")
    fingerprint = {"config": config, "teachers": teachers}
    return {"format": CHECKPOINT_FORMAT, "fingerprint": fingerprint, **state}


def train_fixmatch_ensemble(
    ensemble: StackedModels,
    images: torch.Tensor,
    labels: torch.Tensor,
    parts: Sequence[torch.Tensor],
    config: EnsembleFixMatchConfig,
    *,
    normalize: Normalize,
    weak: Augmentation,
    strong: Augmentation,
    checkpoint_path: str | Path | None = None,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Trains teacher i of ``ensemble`` with FixMatch on labels ``labels[parts[i]]`` and
    every image of ``images`` unlabeled. Returns the EMA parameters (stacked).

    images: uint8 (N, C, H, W) on the device; labels: int64 (N,) (only the entries in the
    parts are read); parts: one index tensor per teacher (disjoint, label-independent).
    checkpoint_path: resumable state, written atomically every ``checkpoint_every`` steps
    (:mod:`labeldp.train.checkpoint`; checkpoints of the layout before it still load).

    Each step runs the training core's loop body (:func:`~labeldp.train.core.train_steps`)
    on the stacked models, with the sampler :class:`PartBatches`, the inputs
    :func:`fixmatch_views` and the gradient :class:`EnsembleFixMatchStep`; the generator is
    reseeded from (seed, step) before every step.
    """
    if len(parts) != ensemble.size:
        raise ConfigError(f"{len(parts)} label parts for {ensemble.size} teachers")
    device = images.device
    n, b = ensemble.size, config.batch_size
    sampler = PartBatches(parts, b, device, unlabeled=config.mu * b)
    optimization = Optimization(
        config.sgd,
        list(ensemble.params.values()),
        config.steps,
        StackedWeightAverage(ensemble.params, config.ema_decay),
    )
    start = 0
    path = Path(checkpoint_path) if checkpoint_path is not None else None
    fingerprint = _ensemble_fingerprint(config, n)
    if path is not None and path.exists():
        state = load_checkpoint(
            path,
            fingerprint=fingerprint,
            device=device,
            mismatch=f"{path} was written by another ensemble configuration",
            upgrade=_legacy_checkpoint,
        )
        with torch.no_grad():
            for k, v in ensemble.params.items():
                v.copy_(state["params"][k])
        optimization.optimizer.load_state_dict(state["optimizer"])
        optimization.ema.load_state_dict(state["ema"])
        start = state["step"]
    targets = HardLabels(labels)
    gradient = EnsembleFixMatchStep(config.threshold, config.lambda_u)
    inputs = fixmatch_views(normalize, weak, strong)
    generator = torch.Generator(device=device)
    bar = tqdm(total=config.steps, initial=start, desc="teachers", disable=not progress)
    for step in range(start, config.steps):
        # One seed per step: a resumed run draws exactly what the uninterrupted one drew.
        generator.manual_seed(derive_seed(config.seed, Stream.ENSEMBLE_STEP, step))
        train_steps(
            ensemble, images, targets, range(step, step + 1), gradient, sampler, generator,
            optimization=optimization, inputs=inputs,
        )  # fmt: skip
        bar.update(1)
        last = step + 1 == config.steps
        if path is not None and ((step + 1) % config.checkpoint_every == 0 or last):
            save_checkpoint(
                path,
                {
                    "format": CHECKPOINT_FORMAT,
                    "fingerprint": fingerprint,
                    "step": step + 1,
                    "params": {k: v.detach() for k, v in ensemble.params.items()},
                    "optimizer": optimization.optimizer.state_dict(),
                    "ema": optimization.ema.state_dict(),
                },
            )
    bar.close()
    return optimization.ema.state_dict()


@torch.no_grad()
def ensemble_votes(
    ensemble: StackedModels,
    params: dict[str, torch.Tensor],
    images: torch.Tensor,
    normalize: Normalize,
    num_classes: int,
    batch_size: int = 500,
) -> torch.Tensor:
    """Vote histograms (Q, K) int64 of the stacked models with ``params`` on uint8 query
    ``images`` (Q, C, H, W): each model votes its argmax (:func:`ensemble_predictions`)."""
    predictions = ensemble_predictions(ensemble, params, images, normalize, batch_size)
    return F.one_hot(predictions, num_classes).sum(0)


@torch.no_grad()
def ensemble_predictions(
    ensemble: StackedModels,
    params: dict[str, torch.Tensor],
    images: torch.Tensor,
    normalize: Normalize,
    batch_size: int = 500,
) -> torch.Tensor:
    """Each model's argmax class (n, Q) int64 with ``params`` on uint8 ``images``
    (Q, C, H, W), model i in row i (e.g. for each teacher's own held-out accuracy)."""
    predictions = []
    for start in range(0, len(images), batch_size):
        x = normalize(images[start : start + batch_size])
        logits = ensemble(x.unsqueeze(0).expand(ensemble.size, *x.shape), params)
        predictions.append(logits.argmax(-1))
    if not predictions:
        return torch.zeros(ensemble.size, 0, dtype=torch.int64)
    return torch.cat(predictions, 1)
