"""Per-example gradients of a user's model, captured during the user's own backward pass.

:class:`GradSampleHooks` puts a forward hook on every module that owns trainable
parameters. While gradients are enabled, each call records the module's inputs (the
activations a) and registers a hook on its output tensor that records the output gradient
g when the user's ``loss.backward()`` reaches it. From (a, g) the per-layer functions of
:mod:`labeldp.train.per_example` (the same ones DPSGDStep uses, with their torch.func
fallback for layers without a formula) give each example's squared gradient norm, the
clipped sum Σᵢ cᵢ gᵢ, or, for tests and oracles, the materialized per-example gradients.

Loss reduction. The per-example gradient is the gradient of that example's own loss.
With ``loss_reduction="sum"`` the recorded g is already that; with ``"mean"`` (PyTorch's
default, ``F.cross_entropy(...)``) the user's loss is (1/B)·Σ lossᵢ for the realised batch
size B, so the per-example gradients are B times those of the recorded g (the output's size
in dim 0): the factor is applied to the results (gradients × B, squared norms × B²), which
are linear in g, rather than to every recorded output gradient (a pass over the
activations saved). A wrong declaration
scales every per-example gradient by B or 1/B: the clipping still bounds each example's
contribution by C (the guarantee holds), but the update is not the intended one; it cannot
be detected from the gradients. What the first step with at least two examples does check
(DPOptimizer): the unclipped sum of the per-example gradients must equal the gradient
autograd left in ``.grad`` (times B for "mean"); a mismatch (a parameter used outside its
module's forward, a layer that mixes examples) is a ConfigError.

One forward and one backward per recorded batch. A module called several times within
one call of the model (a recurrent cell's Linear at every time step, a layer applied to
two inputs of the same example) contributes the sum of its per-call gradients per
example, and the norm clipped is that of the sum (:func:`labeldp.train.per_example.
calls_sq_norms`). Calls from two different forward passes of the model before one step
(a second batch) are refused by name — accumulate physical batches with
:func:`labeldp.dpsgd.virtual_batches` instead, which steps between them: summing
"example i" of two batches would pair unrelated examples. Forward passes are told apart
by hooks on the model itself; a layer called directly, outside the model's forward, may
be recorded once. Forward calls under ``torch.no_grad()`` (evaluation) are not recorded.
The batch is dim 0 of every recorded input and output.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import ConfigError
from ..train.per_example import (
    calls_clipped_sums,
    calls_grad_samples,
    calls_sq_norms,
    clip_factors,
    exact_float32,
    formula_supported,
)

#: Models that already carry hooks (one make_private per model).
_HOOKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass
class _Call:
    args: tuple | None
    batch: int
    forward: int  # the model forward pass it belongs to (-1: outside the model's forward)
    grad: torch.Tensor | None = None
    #: the call's per-example gradients, computed when its output gradient arrived (then
    #: ``args`` and ``grad`` are released; see GradSampleHooks._compact)
    samples: dict[str, torch.Tensor] | None = None

    @property
    def done(self) -> bool:
        """Its backward pass has run."""
        return self.grad is not None or self.samples is not None


@dataclass
class _Layer:
    name: str
    module: nn.Module
    params: dict[str, nn.Parameter]
    calls: list[_Call] = field(default_factory=list)


def trainable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every module owning a trainable parameter (recurse=False)."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if any(p.requires_grad for p in m.parameters(recurse=False))
    ]


class GradSampleHooks:
    """Hooks on ``model`` that capture per-example gradients (see the module docstring).

    loss_reduction: "mean" or "sum", how the user's loss combines the examples of a batch.
    """

    def __init__(self, model: nn.Module, loss_reduction: str = "mean") -> None:
        if model in _HOOKED:
            raise ConfigError(
                "model already has DP-SGD hooks (make_private was called on it before); "
                "call optimizer.detach() on the earlier private optimizer first"
            )
        self.model = model
        self.loss_reduction = loss_reduction
        self.layers = [
            _Layer(name, m, {n: p for n, p in m.named_parameters(recurse=False) if p.requires_grad})
            for name, m in trainable_layers(model)
        ]
        self._paused = False
        self._forwards = 0  # model forward passes started
        self._current = -1  # the model forward pass under way (-1: none)
        self._handles = [
            layer.module.register_forward_hook(self._forward_hook(layer)) for layer in self.layers
        ]
        self._handles += [
            model.register_forward_pre_hook(self._model_enter),
            model.register_forward_hook(self._model_exit, always_call=True),
        ]
        _HOOKED[model] = self

    def remove(self) -> None:
        """Takes the hooks off the model (it is then an ordinary model again)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self.clear()
        _HOOKED.pop(self.model, None)

    def parameters(self) -> list[nn.Parameter]:
        return [p for layer in self.layers for p in layer.params.values()]

    # ------------------------------------------------------------------ recording
    def _model_enter(self, module: nn.Module, args: tuple) -> None:
        if self._current < 0:
            self._forwards += 1
            self._current = self._forwards

    def _model_exit(self, module: nn.Module, args: tuple, output: object) -> None:
        self._current = -1

    def _forward_hook(self, layer: _Layer):
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            if self._paused or not torch.is_grad_enabled():
                return
            if not isinstance(output, torch.Tensor):
                raise ConfigError(
                    f"layer {layer.name or '<model>'} ({type(module).__name__}) returns "
                    f"{type(output).__name__}, not one tensor: its per-example gradients "
                    "cannot be captured (see labeldp.dpsgd.validate)"
                )
            if not output.requires_grad:
                return
            if output.dim() == 0:
                raise ConfigError(
                    f"layer {layer.name or '<model>'} returns a scalar: per-example "
                    "gradients need the batch in dim 0 of its output"
                )
            call = _Call(
                tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args),
                output.shape[0],
                self._current,
            )
            layer.calls.append(call)

            def on_grad(g: torch.Tensor) -> None:
                if call.done:
                    raise ConfigError(
                        f"a second backward pass reached layer {layer.name or '<model>'} "
                        "through the same forward pass: make_private supports one "
                        "backward per forward (sum the losses and call backward once)"
                    )
                call.grad = g.detach()
                self._compact(layer, call)

            output.register_hook(on_grad)

        return hook

    def _compact(self, layer: _Layer, call: _Call) -> None:
        """Memory: when a formula layer's per-example gradients are smaller than the input
        and output gradient they come from (norm layers, early convolutions: few
        parameters, large activations), they are computed as soon as the output gradient
        arrives and (input, output gradient) are released, during the backward pass.
        Larger layers keep (a, g) for the norms without materializing (ghost norms)."""
        if not formula_supported(layer.module) or isinstance(layer.module, nn.Embedding):
            return
        g = call.grad
        per_example = sum(p.numel() for p in layer.params.values())
        a = call.args[0] if call.args and isinstance(call.args[0], torch.Tensor) else None
        if a is None or per_example * call.batch >= a.numel() + g.numel():
            return
        with self._pause():
            call.samples = calls_grad_samples(layer.module, [(call.args, g)])
        call.args, call.grad = None, None

    def clear(self) -> None:
        """Forgets every recorded call."""
        for layer in self.layers:
            layer.calls = []

    def clear_gradients(self) -> None:
        """Forgets the calls whose backward has run (``zero_grad``); calls still waiting for
        their backward pass are kept."""
        for layer in self.layers:
            layer.calls = [c for c in layer.calls if not c.done]

    def _collect(self) -> tuple[list[tuple[_Layer, _Parts]], int | None]:
        """The recorded layers whose backward has run, each with its parts (see _Parts),
        and the batch size."""
        done: list[tuple[_Layer, _Parts]] = []
        batch = None
        forwards = set()
        for layer in self.layers:
            calls = [c for c in layer.calls if c.done]
            ids = {c.forward for c in calls}
            if len(calls) > 1 and (len(ids) > 1 or -1 in ids):
                raise ConfigError(
                    f"layer {layer.name or '<model>'} ({type(layer.module).__name__}) ran "
                    f"{len(calls)} times in {len(ids)} forward passes with a backward pass "
                    "before the optimizer step: make_private supports one forward and one "
                    "backward per step "
                    "(a layer called several times within one call of the model is fine; "
                    "accumulate batches with labeldp.dpsgd.virtual_batches)"
                )
            forwards |= ids - {-1}
            if len(forwards) > 1:
                raise ConfigError(
                    f"layer {layer.name or '<model>'} ({type(layer.module).__name__}) was "
                    "recorded in a different forward pass of the model than other layers, "
                    "before one optimizer step: make_private supports one forward and one "
                    "backward per step (accumulate batches with "
                    "labeldp.dpsgd.virtual_batches)"
                )
            for c in calls:
                if batch is not None and c.batch != batch:
                    raise ConfigError(
                        f"layer {layer.name} saw a batch of {c.batch} examples, other "
                        f"layers or calls {batch}: every layer must map the batch row by "
                        "row (dim 0)"
                    )
                batch = c.batch
            if calls:
                raw = [(c.args, c.grad) for c in calls if c.samples is None]
                dense = [c.samples for c in calls if c.samples is not None]
                scale = float(batch) if self.loss_reduction == "mean" else 1.0
                done.append((layer, _Parts(layer.module, raw, dense, scale)))
        return done, batch

    # ------------------------------------------------------------------ results
    def per_example_gradients(self) -> dict[str, torch.Tensor]:
        """Materialized per-example gradients of the recorded batch: parameter name (as in
        ``model.named_parameters()``) -> (B, *shape). Layers that took no part in the loss
        are absent. Does not clear the record."""
        done, _ = self._collect()
        out: dict[str, torch.Tensor] = {}
        with self._pause():
            for layer, parts in done:
                for pname, v in parts.grad_samples().items():
                    out[_join(layer.name, pname)] = v
        return out

    def clipped_sums(
        self, max_grad_norm: float
    ) -> tuple[dict[nn.Parameter, torch.Tensor], torch.Tensor, int]:
        """Clips each recorded example's gradient (flat, all parameters) to L2 norm
        ``max_grad_norm`` and sums: (parameter -> Σᵢ cᵢ gᵢ (float32/float64), per-example
        norms before clipping (B,), B). Empty when nothing was recorded (B = 0). Clears
        the record."""
        done, batch = self._collect()
        if not done or not batch:
            self.clear()
            return {}, torch.zeros(0), 0
        with self._pause():
            sq = None
            for _, parts in done:
                part = parts.sq_norms()
                sq = part if sq is None else sq + part.to(sq.device)
            norms = sq.clamp_min(0).sqrt()
            factors = clip_factors(norms, max_grad_norm)
            sums: dict[nn.Parameter, torch.Tensor] = {}
            for layer, parts in done:
                for pname, v in parts.clipped_sums(factors).items():
                    sums[layer.params[pname]] = v
        self.clear()
        return sums, norms, batch

    def unclipped_sums(self) -> dict[nn.Parameter, torch.Tensor]:
        """Σᵢ gᵢ of the recorded batch per parameter (for the one-time check against
        autograd's ``.grad``). Does not clear the record."""
        done, batch = self._collect()
        sums: dict[nn.Parameter, torch.Tensor] = {}
        with self._pause():
            for layer, parts in done:
                for pname, v in parts.clipped_sums(torch.ones(batch)).items():
                    sums[layer.params[pname]] = v
        return sums

    def recorded_batch(self) -> int:
        """B of the recorded batch (0 if none)."""
        return self._collect()[1] or 0

    def _pause(self):
        hooks = self

        class _Paused:
            def __enter__(self) -> None:
                hooks._paused = True

            def __exit__(self, *exc: object) -> None:
                hooks._paused = False

        return _Paused()


class _Parts:
    """One layer's recorded calls of a batch: ``raw`` (inputs, output gradient) pairs and
    ``dense`` per-example gradients of compacted calls; the layer's per-example gradient
    is ``scale`` (B for a "mean" loss, else 1) times the sum over all of them."""

    def __init__(
        self, module: nn.Module, raw: list[tuple], dense: list[dict], scale: float = 1.0
    ) -> None:
        self.module, self.raw, self.dense, self.scale = module, raw, dense, scale
        self._summed: dict[str, torch.Tensor] | None = None

    def grad_samples(self) -> dict[str, torch.Tensor]:
        """The layer's per-example gradients (new tensors: the record is not exposed)."""
        if self._summed is None:  # materialized once per batch
            out: dict[str, torch.Tensor] = {}
            for samples in [
                *self.dense,
                *([calls_grad_samples(self.module, self.raw)] if self.raw else []),
            ]:
                for n, v in samples.items():
                    out[n] = v * self.scale if n not in out else out[n] + v * self.scale
            self._summed = out
        return dict(self._summed)

    def sq_norms(self) -> torch.Tensor:
        if not self.dense:
            return calls_sq_norms(self.module, self.raw) * self.scale**2
        grads = self.grad_samples()
        first = next(iter(grads.values()))
        out = torch.zeros(first.shape[0], device=first.device, dtype=first.dtype)
        for v in grads.values():
            out = out + v.reshape(v.shape[0], -1).pow(2).sum(1)
        return out

    def clipped_sums(self, factors: torch.Tensor) -> dict[str, torch.Tensor]:
        if not self.dense:
            factors = factors.to(self.raw[0][1].device) * self.scale
            return calls_clipped_sums(self.module, self.raw, factors)
        with exact_float32():  # TF32 would blur cᵢ·gᵢ past the clipping bound
            return {
                n: torch.tensordot(factors.to(v.device, v.dtype), v, dims=1)
                for n, v in self.grad_samples().items()
            }


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name
