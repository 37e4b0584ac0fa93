"""n stacked models of one architecture run as ONE model with n-fold grouped layers.

The forward pass of n models that differ only in their weights, each on its own batch
(x of shape (n, B, C, H, W)), is a single network whose convolutions have n groups: the
n inputs side by side as the channels of one (B, n·C, H, W) tensor, model i's channels at
[i·C, (i+1)·C). Element-wise layers (activations, pooling) act per channel, so they need
no change; a GroupNorm with g groups per model becomes one with n·g groups; at the first
flatten the activations turn back into (n, B, features) and linear layers become batched
matrix products (``torch.baddbmm``). Convolutions run channels-last, the layout in which
PyTorch's CPU kernels (grouped convolution, stride-1 max-pool) are fastest; this is what
``torch.func.vmap`` of a convolution also does, except that vmap leaves the activations in
the contiguous layout, where a stride-1 max-pool costs ~8x more.

Output and per-model gradients equal those of each model alone (up to float rounding; a
test compares them with vmap and with a loop over the models). The architecture is read
by ``torch.fx`` tracing; the supported layers are :data:`SUPPORTED` (the zoo's ``cnn`` and
``cnn-tanh``), anything else raises :class:`~labeldp.errors.ConfigError` naming the layer,
and :func:`unsupported` says in advance why a model cannot run grouped.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..errors import ConfigError

#: Layers with a grouped form. Element-wise ones apply unchanged.
ELEMENTWISE = (nn.Tanh, nn.ReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.LeakyReLU, nn.Identity)
SUPPORTED = (nn.Conv2d, nn.Linear, nn.MaxPool2d, nn.AvgPool2d, nn.GroupNorm, nn.Flatten)
SUPPORTED += ELEMENTWISE


class _Grouped:
    """A stacked activation in the grouped layout: a (B, n·C, H, W) tensor."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


def _trace(base: nn.Module) -> fx.GraphModule:
    try:
        return fx.symbolic_trace(base)
    except Exception as error:  # fx raises many kinds for data-dependent control flow
        raise ConfigError(
            f"forward='grouped' needs a model that torch.fx can trace; "
            f"{type(base).__name__} cannot be: {error}"
        ) from error


def unsupported(base: nn.Module) -> str | None:
    """Why ``base`` cannot run grouped (the first unsupported layer or operation), or None."""
    try:
        graph = _trace(base)
    except ConfigError as error:
        return str(error)
    for node in graph.graph.nodes:
        if node.op in ("call_function", "call_method"):
            return f"it calls {node.target!r} outside a layer (only layers are supported)"
        if node.op == "call_module":
            layer = graph.get_submodule(node.target)
            if not isinstance(layer, SUPPORTED):
                return f"layer {node.target} is a {type(layer).__name__}"
            if isinstance(layer, nn.Conv2d) and layer.padding_mode != "zeros":
                return f"layer {node.target} pads with {layer.padding_mode!r} (only zeros)"
            if isinstance(layer, nn.Flatten) and (layer.start_dim, layer.end_dim) != (1, -1):
                return f"layer {node.target} flattens dims {layer.start_dim}..{layer.end_dim}"
    return None


class GroupedForward:
    """The grouped forward pass of a stack of models of ``base``'s architecture.

    ``self(params, x)``: params maps each parameter name of ``base`` to its stacked tensor
    (n, ...); x is (n, B, ...), model i's inputs at x[i]; returns (n, B, K) outputs.
    Raises ConfigError at construction when ``base`` is not supported (:func:`unsupported`).
    """

    def __init__(self, base: nn.Module) -> None:
        reason = unsupported(base)
        if reason is not None:
            raise ConfigError(f"forward='grouped' cannot run {type(base).__name__}: {reason}")
        self.graph = _trace(base)

    def __call__(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        out = _Interpreter(self.graph, params, x.shape[0]).run(x)
        if isinstance(out, _Grouped):  # a model that ends in a convolution or pooling
            out = _ungroup(out, x.shape[0])
        return out


def grouped_forward(base: nn.Module) -> GroupedForward | None:
    """The :class:`GroupedForward` of ``base``'s architecture, or None when it has no
    grouped form; cached per architecture (class and layers), as stacks are built often."""
    return _cached(type(base), repr(base), base)


_CACHE: dict[tuple[type, str], GroupedForward | None] = {}


def _cached(kind: type, layers: str, base: nn.Module) -> GroupedForward | None:
    key = (kind, layers)
    if key not in _CACHE:
        _CACHE[key] = GroupedForward(base) if unsupported(base) is None else None
    return _CACHE[key]


def _ungroup(x: _Grouped, n: int) -> torch.Tensor:
    """(B, n·C, H, W) → (n, B, C, H, W)."""
    t = x.tensor
    return t.view(t.shape[0], n, -1, *t.shape[2:]).transpose(0, 1)


class _Interpreter(fx.Interpreter):
    def __init__(self, graph: fx.GraphModule, params: dict[str, torch.Tensor], n: int) -> None:
        super().__init__(graph)
        self.params = params
        self.n = n

    def _param(self, target: str, name: str) -> torch.Tensor | None:
        return self.params.get(f"{target}.{name}")

    def call_module(self, target, args, kwargs):
        layer = self.module.get_submodule(target)
        x, n = args[0], self.n
        if isinstance(layer, nn.Conv2d):
            if not isinstance(x, _Grouped):
                x = _Grouped(_group_input(x, n))
            weight = self._param(target, "weight")
            weight = weight.reshape(n * weight.shape[1], *weight.shape[2:])
            bias = self._param(target, "bias")
            return _Grouped(
                F.conv2d(
                    x.tensor,
                    weight.contiguous(memory_format=torch.channels_last),
                    None if bias is None else bias.reshape(-1),
                    layer.stride,
                    layer.padding,
                    layer.dilation,
                    n * layer.groups,
                )
            )
        if isinstance(layer, nn.GroupNorm):
            weight, bias = self._param(target, "weight"), self._param(target, "bias")
            grouped = x if isinstance(x, _Grouped) else _Grouped(_group_input(x, n))
            return _Grouped(
                F.group_norm(
                    grouped.tensor,
                    n * layer.num_groups,
                    None if weight is None else weight.reshape(-1),
                    None if bias is None else bias.reshape(-1),
                    layer.eps,
                )
            )
        if isinstance(layer, nn.Flatten):
            if isinstance(x, _Grouped):
                x = _ungroup(x, n)
            return x.reshape(x.shape[0], x.shape[1], -1)
        if isinstance(layer, nn.Linear):
            weight, bias = self._param(target, "weight"), self._param(target, "bias")
            if isinstance(x, _Grouped):
                x = _ungroup(x, n)
            if bias is None:
                return torch.matmul(x, weight.transpose(-1, -2))
            if x.dim() == 3:
                return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))
            return torch.matmul(x, weight.transpose(-1, -2)) + bias.unsqueeze(1)
        # element-wise layers and pooling act per channel: the grouped layout needs no change
        if isinstance(x, _Grouped):
            return _Grouped(layer(x.tensor))
        if isinstance(layer, (nn.MaxPool2d, nn.AvgPool2d)):
            return _Grouped(layer(_group_input(x, n)))
        return layer(x)


def _group_input(x: torch.Tensor, n: int) -> torch.Tensor:
    """(n, B, C, H, W) → (B, n·C, H, W), channels-last."""
    _, b, c, h, w = x.shape
    return x.transpose(0, 1).reshape(b, n * c, h, w).contiguous(memory_format=torch.channels_last)
