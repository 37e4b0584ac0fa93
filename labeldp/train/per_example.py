"""Per-example gradients, their norms and their clipped sum: what a DP-SGD step needs.

Two ways to the same numbers:

- :func:`per_example_gradients` — torch.func (``vmap`` over ``grad`` of a functional
  call). Works for any model without batch statistics; materializes every example's full
  gradient (B × parameters).
- :class:`LayerwiseClipping` — one ordinary forward and backward with hooks, then per-layer
  formulas: the per-example gradient of a linear, convolution, group-norm or embedding
  layer is a product of the layer's input and its output gradient, so its norm and the
  clipped sum Σᵢ cᵢ gᵢ can be formed from those two without storing B gradients ("book-
  keeping" of Bu et al. 2023; per layer the cheaper of a materialized product and a
  "ghost" norm via Gram matrices, Li et al. 2022). The clipped sum of a convolution is one
  weight-gradient convolution on the scaled output gradient. Faster and lighter than
  materializing. Layers without a formula get torch.func on that layer alone. Used
  whenever no parameter is shared and every layer call takes one tensor input (a layer
  called several times contributes the sum of its calls; DPSGDStep checks the pass at run
  time and falls back to :func:`per_example_gradients`).

The per-layer formulas are module functions (:func:`layer_sq_norms`,
:func:`layer_clipped_sums`, :func:`layer_grad_samples`, from one layer's input and output
gradient), shared by :class:`LayerwiseClipping` and by :mod:`labeldp.dpsgd`'s hooks
(``make_private``). They cover Linear, Conv1d/2d/3d (any groups, stride, dilation,
padding and padding mode), GroupNorm, LayerNorm, InstanceNorm (without running
statistics) and Embedding (:func:`formula_supported`); a layer type with a function
registered by :func:`register_grad_sampler` uses that; any other layer with parameters
falls back to torch.func on that layer alone (:func:`functional_grad_samples`). A layer
called several times in one pass (a recurrent cell) contributes the sum of its per-call
gradients (:func:`calls_sq_norms` and friends, used by :mod:`labeldp.dpsgd`'s hooks and
by :class:`LayerwiseClipping`).

Both are tested against Opacus (grad samples) and against each other.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from ..errors import ConfigError
from .targets import target_loss

#: Added to the per-example norm before dividing, as in Opacus: C / (‖g‖ + 1e-6).
NORM_EPS = 1e-6


def per_example_gradients(
    model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Gradients of each example's loss with respect to every trainable parameter.

    inputs: (B, ...) model inputs; targets: (B,) hard labels or (B, K) soft targets.
    Returns (gradients: name -> (B, *parameter shape), per-example losses (B,), logits
    (B, K)), all detached. The model must be free of batch statistics.
    """
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def loss_one(p: dict[str, torch.Tensor], x: torch.Tensor, t: torch.Tensor):
        logits = functional_call(model, (p, buffers), (x.unsqueeze(0),))
        loss = target_loss(logits, t.unsqueeze(0))
        return loss, (loss.detach(), logits.detach().squeeze(0))

    grads, (losses, logits) = vmap(
        grad(loss_one, has_aux=True), in_dims=(None, 0, 0), randomness="different"
    )(params, inputs, targets)
    return grads, losses, logits


def _wide(t: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16 (autocast) -> float32; float32 and float64 unchanged."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


class _exact_float32(contextlib.ContextDecorator):
    """TF32 off for CUDA matmuls and convolutions while norms and clipped sums are formed:
    a clipped contribution must not exceed the norm it was clipped by (TF32 rounds to
    10-bit mantissas)."""

    def __enter__(self) -> None:
        self._saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False

    def __exit__(self, *exc: object) -> None:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self._saved


#: The same, public: ``with exact_float32(): ...`` around any other clipped-sum product.
exact_float32 = _exact_float32


def clip_factors(norms: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    """Per-example scale min(1, C / (‖g‖₂ + 1e-6)) for per-example norms (B,)."""
    return (max_grad_norm / (norms + NORM_EPS)).clamp(max=1.0)


def gradient_norms(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-example L2 norm over all parameters together ("flat"), (B,), float32."""
    per_parameter = [torch.linalg.vector_norm(_wide(g.flatten(1)), dim=1) for g in grads.values()]
    return torch.linalg.vector_norm(torch.stack(per_parameter), dim=0)


# ----------------------------------------------------------------- layer-wise path
class LayerwiseUnsupported(Exception):
    """The model's forward pass does something the layer-wise path cannot follow (a layer
    that did not run, an output changed in place, a call with several inputs); use
    :func:`per_example_gradients`."""


_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_INSTANCE_NORMS = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
#: Exact types with a closed-form per-example gradient (see formula_supported).
FORMULA_LAYERS = (nn.Linear, *_CONVS, nn.GroupNorm, nn.LayerNorm, *_INSTANCE_NORMS, nn.Embedding)


def _own_names(module: nn.Module) -> set[str]:
    return {n for n, p in module.named_parameters(recurse=False) if p.requires_grad}


def _formula_type_ok(module: nn.Module) -> bool:
    if type(module) is nn.Embedding:
        return module.max_norm is None and not module.scale_grad_by_freq and not module.sparse
    if type(module) in _INSTANCE_NORMS:
        # running statistics: in eval mode the layer normalizes by them, not by the input's
        return not module.track_running_stats
    return type(module) in FORMULA_LAYERS


def layerwise_supported(model: nn.Module) -> bool:
    """True if no trainable parameter is shared between modules: then every parameter
    belongs to exactly one layer, whose per-example gradients come from its formula
    (:func:`formula_supported`), its registered grad sampler, or torch.func on that layer
    alone. The forward pass is checked further at run time (see
    :class:`LayerwiseClipping`: each layer call with one tensor input, mapping the batch
    row by row); DPSGDStep also compares the norms once with whole-model
    torch.func."""
    owners: dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if p.requires_grad:
                owners[id(p)] = owners.get(id(p), 0) + 1
    return all(count == 1 for count in owners.values())


def unfold2d(
    a: torch.Tensor,
    kernel: tuple[int, int],
    dilation: tuple[int, int],
    padding: tuple[int, int],
    stride: tuple[int, int],
) -> torch.Tensor:
    """``F.unfold`` (im2col) of a (B, C, H, W): (B, C·kh·kw, positions), by strided views.
    Same values and order as ``F.unfold``, which on CPU is ~100x slower (torch 2.13)."""
    (kh, kw), (dh, dw), (ph, pw), (sh, sw) = kernel, dilation, padding, stride
    padded = F.pad(a, (pw, pw, ph, ph))
    windows = padded.unfold(2, dh * (kh - 1) + 1, sh).unfold(3, dw * (kw - 1) + 1, sw)
    windows = windows[..., ::dh, ::dw]  # (B, C, H_out, W_out, kh, kw)
    b, c, ho, wo = windows.shape[:4]
    return windows.permute(0, 1, 4, 5, 2, 3).reshape(b, c * kh * kw, ho * wo)


#: Elements of the temporaries one chunk of examples may hold while per-example norms are
#: computed (2^22 floats = 16 MiB in float32): the norms of a batch are computed in chunks
#: of examples, so that peak memory stays near the non-private step's whatever B.
NORM_CHUNK_ELEMENTS = 1 << 22


def _example_chunks(batch: int, per_example: int) -> list[slice]:
    """Slices of the batch holding at most NORM_CHUNK_ELEMENTS temporaries (≥ 1 example)."""
    size = max(1, NORM_CHUNK_ELEMENTS // max(1, per_example))
    return [slice(i, min(i + size, batch)) for i in range(0, batch, size)]


def _sq_norm_product(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per-example ‖Σ_t g_t a_tᵀ‖²_F for a (B, T, d), g (B, T, p): materialized (B·p·d) or
    ghost (B·T², ‖·‖² = Σ_{t,s} ⟨a_t, a_s⟩⟨g_t, g_s⟩), whichever is smaller, in chunks of
    examples (NORM_CHUNK_ELEMENTS)."""
    b, t, d, p = a.shape[0], a.shape[1], a.shape[2], g.shape[2]
    if t == 1:
        return a.squeeze(1).pow(2).sum(1) * g.squeeze(1).pow(2).sum(1)
    ghost = t * t <= p * d
    parts = []
    for c in _example_chunks(b, 2 * t * t if ghost else p * d):
        ac, gc = a[c], g[c]
        if ghost:
            gram = torch.bmm(ac, ac.transpose(1, 2)) * torch.bmm(gc, gc.transpose(1, 2))
            parts.append(gram.sum((1, 2)))
        else:
            product = torch.bmm(gc.transpose(1, 2), ac).flatten(1)
            parts.append(torch.linalg.vector_norm(product, dim=1).pow(2))
    return torch.cat(parts)


# ------------------------------------------------------------ per-layer formulas
# One implementation of "a layer's per-example gradients from (its input a, its output
# gradient g)", shared by LayerwiseClipping (DPSGDStep) and labeldp.dpsgd's hooks.
# Units: a and g carry the batch in dim 0 (B examples); g is the gradient of the SUM of the
# per-example losses w.r.t. the layer's output (so row i is example i's own gradient).
# Results cover the layer's own trainable parameters only (recurse=False), keyed by their
# local names ("weight", "bias", ...). Layers without a formula (formula_supported False)
# go through torch.func (vmap over the gradient of <layer(a_i), g_i> w.r.t. the layer's
# own parameters, Opacus' functorch fallback): exact for any layer whose output row i
# depends on input row i alone and that draws no random numbers (vmap refuses those).


def formula_supported(module: nn.Module) -> bool:
    """True if ``module`` is exactly one of the layer types with a closed-form per-example
    gradient and its trainable parameters are only its weight and bias: Linear;
    Conv1d/2d/3d with any groups, stride, dilation, numeric or string ("same", "valid")
    padding and any padding mode (the recorded input is padded explicitly); GroupNorm;
    LayerNorm; InstanceNorm1d/2d/3d without running statistics; Embedding without
    max_norm, frequency scaling or sparse gradients. Layers with a registered grad sampler
    (:func:`register_grad_sampler`) use it instead; other layers with parameters use the
    torch.func fallback."""
    if type(module) in _GRAD_SAMPLERS:
        return False
    return _own_names(module) <= {"weight", "bias"} and _formula_type_ok(module)


# ------------------------------------------------------------ registered grad samplers
_GRAD_SAMPLERS: dict[type, Callable] = {}


def register_grad_sampler(*layer_types: type) -> Callable[[Callable], Callable]:
    """Decorator registering a per-example gradient function for user-defined layer types.

    ``@register_grad_sampler(MyLayer)`` on ``fn(layer, activations, output_grad)``:

    - ``layer``: the MyLayer instance (exact type match: subclasses are not covered);
    - ``activations``: tuple of the layer's positional forward arguments as recorded
      (tensors detached), batch in dim 0;
    - ``output_grad``: (B, *output shape[1:]), row i the gradient of example i's own loss
      with respect to the layer's output (float32, or float64 for a float64 model);
    - returns ``{parameter name (local, as in layer.named_parameters(recurse=False)) or
      the nn.Parameter itself: per-example gradient (B, *parameter shape)}`` covering
      every trainable parameter of the layer itself (its children have their own hooks).

    Per-example means: row i is the gradient of <layer(activations row i), output_grad row
    i> with respect to the parameter, for the layer applied to example i alone. Used by
    :mod:`labeldp.dpsgd`'s hooks and by :class:`LayerwiseClipping` (DPSGDStep) in place of
    the torch.func fallback. Returns ``fn`` unchanged. Registering a type again replaces
    its function; registering a built-in formula type overrides the formula."""
    for t in layer_types:
        if not isinstance(t, type) or not issubclass(t, nn.Module):
            raise ConfigError(f"register_grad_sampler takes nn.Module subclasses, got {t!r}")
    if not layer_types:
        raise ConfigError("register_grad_sampler needs at least one layer type")

    def decorator(fn: Callable) -> Callable:
        if not callable(fn):
            raise ConfigError(f"register_grad_sampler decorates a function, got {fn!r}")
        for t in layer_types:
            _GRAD_SAMPLERS[t] = fn
        return fn

    return decorator


def registered_grad_sampler(module: nn.Module) -> Callable | None:
    """The function registered for ``type(module)`` (exact type), or None."""
    return _GRAD_SAMPLERS.get(type(module))


def _registered_samples(
    fn: Callable, module: nn.Module, a: torch.Tensor | tuple, g: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Calls a registered sampler and checks its answer (names, shapes)."""
    own = _own_trainable(module)
    by_id = {id(p): n for n, p in own.items()}
    raw = fn(module, _as_args(a), g)
    if not isinstance(raw, dict):
        raise ConfigError(
            f"the grad sampler registered for {type(module).__name__} must return a dict "
            f"(parameter name -> (B, *shape)), got {type(raw).__name__}"
        )
    out: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        name = by_id.get(id(key)) if isinstance(key, nn.Parameter) else key
        if name not in own:
            continue  # frozen parameters, or a child's: not this layer's to report
        want = (g.shape[0], *own[name].shape)
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != want:
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value)
            raise ConfigError(
                f"the grad sampler registered for {type(module).__name__} returned {got} "
                f"for {name!r}; expected shape {want} (batch, *parameter shape)"
            )
        out[name] = _wide(value)
    missing = set(own) - set(out)
    if missing:
        raise ConfigError(
            f"the grad sampler registered for {type(module).__name__} did not return "
            f"{sorted(missing)} (every trainable parameter of the layer itself)"
        )
    return out


def _as_args(a: torch.Tensor | tuple) -> tuple:
    return a if isinstance(a, tuple) else (a,)


def _own_trainable(module: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in module.named_parameters(recurse=False) if p.requires_grad}


def functional_grad_samples(
    module: nn.Module, args: torch.Tensor | tuple, g: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Per-example gradients of ``module``'s own trainable parameters by torch.func: for
    each example i, the gradient of <module(a_i), g_i> (a_i: row i of every tensor
    argument with the batch's size in dim 0; other arguments passed unchanged). Returns
    local name -> (B, *parameter shape), in the parameter's dtype. The module's children
    and buffers are held fixed; forward hooks fire on the calls, so callers that record
    calls must pause while this runs."""
    args = _as_args(args)
    batch = g.shape[0]
    params = {n: p.detach() for n, p in _own_trainable(module).items()}
    if batch == 0:
        return {n: p.new_zeros((0, *p.shape)) for n, p in params.items()}
    batched = [isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == batch for x in args]

    def inner(p: dict[str, torch.Tensor], gi: torch.Tensor, *xs: object) -> torch.Tensor:
        call = tuple(x.unsqueeze(0) if b else x for x, b in zip(xs, batched, strict=True))
        out = functional_call(module, p, call, strict=False)
        return (out * gi.unsqueeze(0).to(out.dtype)).sum()

    in_dims = (None, 0, *(0 if b else None for b in batched))
    with torch.enable_grad():
        return vmap(grad(inner), in_dims=in_dims, randomness="error")(params, g, *args)


def groupnorm_parts(
    m: nn.GroupNorm, a: torch.Tensor, g: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example GroupNorm weight and bias gradients, each (B, C)."""
    normalized = F.group_norm(a, m.num_groups, eps=m.eps)
    if g.dim() == 2:
        return g * normalized, g
    dims = tuple(range(2, g.dim()))
    return (g * normalized).sum(dims), g.sum(dims)


def _norm_parts(m: nn.Module, a: torch.Tensor, g: torch.Tensor) -> tuple:
    """Per-example (weight, bias) gradients of GroupNorm (B, C), InstanceNorm (B, C) or
    LayerNorm (B, *normalized_shape): Σ over the normalized positions of x̂·g, and Σ g,
    with x̂ the input normalized without the affine parameters."""
    if isinstance(m, nn.GroupNorm):
        return groupnorm_parts(m, a, g)
    b = g.shape[0]
    if isinstance(m, nn.LayerNorm):
        shape = tuple(m.normalized_shape)
        normalized = F.layer_norm(a, shape, eps=m.eps)
        return (
            (normalized * g).reshape(b, -1, *shape).sum(1),
            g.reshape(b, -1, *shape).sum(1),
        )
    normalized = F.instance_norm(a, eps=m.eps)  # InstanceNorm: the input's own statistics
    return (normalized * g).flatten(2).sum(2), g.flatten(2).sum(2)


def _conv_padded(m: nn.Module, a: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """(input as the convolution reads it, padding still to apply): numeric zero padding
    is left to the convolution; string padding ("same" may be asymmetric) and the
    reflect/replicate/circular modes are applied here, as the layer's forward does."""
    if m.padding_mode == "zeros" and not isinstance(m.padding, str):
        return a, tuple(m.padding)
    mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
    n = len(m.kernel_size)
    return F.pad(a, list(m._reversed_padding_repeated_twice), mode=mode), (0,) * n


def unfold_nd(
    a: torch.Tensor,
    kernel: tuple[int, ...],
    dilation: tuple[int, ...],
    padding: tuple[int, ...],
    stride: tuple[int, ...],
) -> torch.Tensor:
    """im2col of a (B, C, *spatial) with n = len(kernel) spatial dims (1 to 3): (B,
    C·Πkernel, Πoutput positions), channel-major then kernel offsets, as ``F.unfold`` in
    2-D. Zero ``padding`` on both sides of every spatial dim."""
    n = len(kernel)
    pads = [p for q in reversed(padding) for p in (q, q)]
    windows = F.pad(a, pads) if any(padding) else a
    for i in range(n):
        windows = windows.unfold(2 + i, dilation[i] * (kernel[i] - 1) + 1, stride[i])
    if any(d > 1 for d in dilation):
        windows = windows[(..., *(slice(None, None, d) for d in dilation))]
    b, c, out = windows.shape[0], windows.shape[1], windows.shape[2 : 2 + n]
    order = (0, 1, *range(2 + n, 2 + 2 * n), *range(2, 2 + n))
    return windows.permute(order).reshape(b, c * math.prod(kernel), math.prod(out))


def _conv_groups(m: nn.Module, a: torch.Tensor, g: torch.Tensor) -> tuple:
    """Unfolded input (B·G, T, d_g) and output gradient (B·G, T, p_g) per group G of a
    convolution (T output positions, d_g = C_in/G·Πkernel, p_g = C_out/G)."""
    padded, pad = _conv_padded(m, a)
    u = unfold_nd(padded, m.kernel_size, m.dilation, pad, m.stride)  # (B, d, T)
    b, t, groups = u.shape[0], u.shape[2], m.groups
    ug = u.reshape(b * groups, -1, t).transpose(1, 2)
    gg = g.reshape(b * groups, -1, t).transpose(1, 2)
    return ug, gg


def _conv_chunks(m: nn.Module, a: torch.Tensor, g: torch.Tensor) -> list[slice]:
    """Chunks of examples for a convolution's unfolded input (C_in·Πkernel·T per example,
    far larger than the layer's per-example gradients in an early convolution): the norms
    and the per-example gradients are built chunk by chunk (NORM_CHUNK_ELEMENTS)."""
    return _example_chunks(
        g.shape[0], a.shape[1] * math.prod(m.kernel_size) * math.prod(g.shape[2:])
    )


_CONV_WEIGHT = {
    1: torch.nn.grad.conv1d_weight,
    2: torch.nn.grad.conv2d_weight,
    3: torch.nn.grad.conv3d_weight,
}


def _trainable(m: nn.Module, name: str) -> bool:
    p = getattr(m, name, None)
    return isinstance(p, nn.Parameter) and p.requires_grad


@_exact_float32()
def layer_sq_norms(module: nn.Module, a: torch.Tensor | tuple, g: torch.Tensor) -> torch.Tensor:
    """Per-example squared L2 norm of the gradient of ``module``'s own trainable parameters
    together, (B,), float32 (float64 for float64 inputs), from the layer's input ``a`` and
    output gradient ``g`` (see the section comment). Formula layers never materialize the
    B gradients (ghost norms where cheaper); registered samplers and the torch.func
    fallback materialize them."""
    if not formula_supported(module):
        grads = _materialized(module, a, g)
        b = g.shape[0]
        out = torch.zeros(b, device=g.device, dtype=_wide(g).dtype)
        for v in grads.values():
            out = out + _wide(v).reshape(b, -1).pow(2).sum(1).to(out.dtype)
        return out
    m, a = module, _as_args(a)[0]
    a = a if isinstance(m, nn.Embedding) else _wide(a)
    g = _wide(g)
    b = g.shape[0]
    out = torch.zeros(b, device=g.device, dtype=g.dtype)
    if isinstance(m, nn.Linear):
        a3, g3 = a.reshape(b, -1, a.shape[-1]), g.reshape(b, -1, g.shape[-1])
        if _trainable(m, "weight"):
            out += _sq_norm_product(a3.to(g.dtype), g3)
        if _trainable(m, "bias"):
            out += g3.sum(1).pow(2).sum(1)
    elif isinstance(m, _CONVS):
        if _trainable(m, "weight"):
            a = a.to(g.dtype)
            for c in _conv_chunks(m, a, g):
                ug, gg = _conv_groups(m, a[c], g[c])
                out[c] += _sq_norm_product(ug, gg).reshape(-1, m.groups).sum(1)
        if _trainable(m, "bias"):
            out += g.flatten(2).sum(2).pow(2).sum(1)
    elif isinstance(m, (nn.GroupNorm, nn.LayerNorm, *_INSTANCE_NORMS)):
        gw, gb = _norm_parts(m, a.to(g.dtype), g)
        if _trainable(m, "weight"):
            out += gw.reshape(b, -1).pow(2).sum(1)
        if _trainable(m, "bias"):
            out += gb.reshape(b, -1).pow(2).sum(1)
    elif isinstance(m, nn.Embedding):
        idx = a.long().reshape(b, -1)
        g3 = g.reshape(b, idx.shape[1], -1)
        same = idx[:, :, None] == idx[:, None, :]
        if m.padding_idx is not None:
            keep = idx != m.padding_idx
            same &= keep[:, :, None] & keep[:, None, :]
        out += (same * torch.bmm(g3, g3.transpose(1, 2))).sum((1, 2))
    return out


def _materialized(module: nn.Module, a: torch.Tensor | tuple, g: torch.Tensor) -> dict:
    """Per-example gradients of a layer without a formula: its registered sampler, else
    torch.func."""
    fn = registered_grad_sampler(module)
    if fn is not None:
        return _registered_samples(fn, module, a, _wide(g))
    return {n: _wide(v) for n, v in functional_grad_samples(module, a, g).items()}


@_exact_float32()
def layer_clipped_sums(
    module: nn.Module, a: torch.Tensor | tuple, g: torch.Tensor, factors: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Σᵢ cᵢ gᵢ over the batch for each of ``module``'s own trainable parameters (local
    name -> tensor of the parameter's shape, float32, float64 for float64 inputs), where
    ``factors`` (B,) are the per-example scales cᵢ (e.g. :func:`clip_factors`)."""
    c = factors.reshape(-1, *([1] * (g.dim() - 1)))
    scaled = _wide(g) * c.to(_wide(g).dtype)
    trainable = _own_trainable(module)
    if not formula_supported(module):
        grads = _materialized(module, a, scaled)
        return {n: v.sum(0) for n, v in grads.items()}
    sums = _formula_sums(module, _as_args(a)[0], scaled)
    return {n: v for n, v in sums.items() if n in trainable}


def _formula_sums(m: nn.Module, a: torch.Tensor, g: torch.Tensor) -> dict:
    a = a if isinstance(m, nn.Embedding) else _wide(a).to(g.dtype)
    if isinstance(m, nn.Linear):
        g2, a2 = g.reshape(-1, g.shape[-1]), a.reshape(-1, a.shape[-1])
        return {"weight": g2.t() @ a2, "bias": g2.sum(0)}
    if isinstance(m, _CONVS):
        # A weight-gradient convolution on the scaled output gradients; TF32 is off here
        # (see _exact_float32), so it sums the same fp32 products the norms measured.
        padded, pad = _conv_padded(m, a)
        weight = _CONV_WEIGHT[len(m.kernel_size)](
            padded, m.weight.shape, g, m.stride, pad, m.dilation, m.groups
        )
        return {"weight": weight, "bias": g.sum((0, *range(2, g.dim())))}
    if isinstance(m, (nn.GroupNorm, nn.LayerNorm, *_INSTANCE_NORMS)):
        gw, gb = _norm_parts(m, a, g)
        return {"weight": gw.sum(0), "bias": gb.sum(0)}
    if isinstance(m, nn.Embedding):
        idx = a.long().flatten()
        rows = g.reshape(idx.shape[0], -1)
        weight = torch.zeros_like(m.weight, dtype=g.dtype).index_add_(0, idx, rows)
        if m.padding_idx is not None:
            weight[m.padding_idx] = 0
        return {"weight": weight}
    raise RuntimeError(f"no formula for {type(m).__name__} (formula_supported let it in)")


@_exact_float32()
def layer_grad_samples(
    module: nn.Module, a: torch.Tensor | tuple, g: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Materialized per-example gradients of ``module``'s own trainable parameters (local
    name -> (B, *parameter shape)): B times the memory of the parameters; for tests,
    oracles and users who want them (clipping needs only :func:`layer_sq_norms` and
    :func:`layer_clipped_sums`)."""
    trainable = _own_trainable(module)
    if not formula_supported(module):
        return _materialized(module, a, g)
    m, a = module, _as_args(a)[0]
    a = a if isinstance(m, nn.Embedding) else _wide(a)
    g = _wide(g)
    b = g.shape[0]
    out: dict[str, torch.Tensor] = {}
    if isinstance(m, nn.Linear):
        a3 = a.reshape(b, -1, a.shape[-1]).to(g.dtype)
        g3 = g.reshape(b, -1, g.shape[-1])
        out = {"weight": torch.bmm(g3.transpose(1, 2), a3), "bias": g3.sum(1)}
    elif isinstance(m, _CONVS):
        a = a.to(g.dtype)
        w = torch.empty((b, *m.weight.shape), device=g.device, dtype=g.dtype)
        for c in _conv_chunks(m, a, g):
            ug, gg = _conv_groups(m, a[c], g[c])
            # (B_c·G, C_out/G, C_in/G·Πkernel) -> (B_c, *weight shape)
            w[c] = torch.bmm(gg.transpose(1, 2), ug).reshape(-1, *m.weight.shape)
        out = {"weight": w, "bias": g.sum(tuple(range(2, g.dim())))}
    elif isinstance(m, (nn.GroupNorm, nn.LayerNorm, *_INSTANCE_NORMS)):
        gw, gb = _norm_parts(m, a.to(g.dtype), g)
        out = {"weight": gw, "bias": gb}
    elif isinstance(m, nn.Embedding):
        idx = a.long().reshape(b, -1)
        rows = g.reshape(b, idx.shape[1], -1)
        weight = torch.zeros((b, *m.weight.shape), device=g.device, dtype=g.dtype)
        weight.scatter_add_(1, idx[:, :, None].expand_as(rows), rows)
        if m.padding_idx is not None:
            weight[:, m.padding_idx] = 0
        out = {"weight": weight}
    return {n: v for n, v in out.items() if n in trainable}


# ------------------------------------------------- a layer called several times per pass
# A layer applied k times in one forward pass (a recurrent cell's Linear at every time
# step) has per-example gradient Σ_k g_ik, the sum of its per-call gradients; the norm
# that clipping needs is of that sum. Linear and Embedding calls are stacked along the
# sequence dimension (their formula is already a sum over positions: exact); other
# layers materialize each call's per-example gradients and add them. `calls` is a list
# of (input a, output gradient g), every g with the same batch size B in dim 0.


def _merge_calls(module: nn.Module, calls: list[tuple]) -> tuple | None:
    """One (a, g) equivalent to ``calls`` for Linear/Embedding formulas, else None."""
    if len(calls) == 1:
        a, g = calls[0]
        return _as_args(a)[0], g
    if not formula_supported(module) or not isinstance(module, (nn.Linear, nn.Embedding)):
        return None
    b = calls[0][1].shape[0]
    if isinstance(module, nn.Linear):
        xs = [_as_args(a)[0] for a, _ in calls]
        a = torch.cat([x.reshape(b, -1, x.shape[-1]).to(xs[0].dtype) for x in xs], 1)
    else:
        a = torch.cat([_as_args(x)[0].reshape(b, -1) for x, _ in calls], 1)
    gs = [g for _, g in calls]
    dtype = torch.promote_types(gs[0].dtype, torch.float32)
    g = torch.cat([x.reshape(b, -1, x.shape[-1]).to(dtype) for x in gs], 1)
    return a, g


def calls_sq_norms(module: nn.Module, calls: list[tuple]) -> torch.Tensor:
    """:func:`layer_sq_norms` of the summed per-example gradient of several calls."""
    merged = _merge_calls(module, calls)
    if merged is not None:
        return layer_sq_norms(module, *merged)
    total = calls_grad_samples(module, calls)
    b = calls[0][1].shape[0]
    out = torch.zeros(b, device=calls[0][1].device, dtype=_wide(calls[0][1]).dtype)
    for v in total.values():
        out = out + v.reshape(b, -1).pow(2).sum(1).to(out.dtype)
    return out


def calls_clipped_sums(
    module: nn.Module, calls: list[tuple], factors: torch.Tensor
) -> dict[str, torch.Tensor]:
    """:func:`layer_clipped_sums` of several calls: Σᵢ cᵢ Σ_k g_ik (linear in g, so the
    per-call sums are added)."""
    merged = _merge_calls(module, calls)
    if merged is not None:
        return layer_clipped_sums(module, *merged, factors)
    out: dict[str, torch.Tensor] = {}
    for a, g in calls:
        for n, v in layer_clipped_sums(module, a, g, factors).items():
            out[n] = v if n not in out else out[n] + v
    return out


def calls_grad_samples(module: nn.Module, calls: list[tuple]) -> dict[str, torch.Tensor]:
    """:func:`layer_grad_samples` of several calls: Σ_k of each call's (B, *shape)."""
    merged = _merge_calls(module, calls)
    if merged is not None:
        return layer_grad_samples(module, *merged)
    out: dict[str, torch.Tensor] = {}
    for a, g in calls:
        for n, v in layer_grad_samples(module, a, g).items():
            out[n] = v if n not in out else out[n] + v
    return out


class LayerwiseClipping:
    """Per-example norms and the clipped gradient sum of ``model`` from one forward and one
    backward pass, for models that :func:`layerwise_supported` accepts.

    Usage: ``losses, logits = lc.forward_backward(inputs, targets)``; then
    ``lc.sq_norms()`` (B,) and ``lc.clipped_sums(factors)`` (name -> tensor like the
    parameter). Inputs and output gradients of each layer are kept only until then.
    Each layer's part comes from the shared per-layer functions (formula, registered
    sampler, or torch.func on that layer). A layer called several times in one pass (the
    Linears of a recurrent cell at every time step, :mod:`labeldp.dpsgd.layers`)
    contributes the sum of its calls' per-example gradients (:func:`calls_sq_norms`), as
    under :func:`labeldp.dpsgd.make_private`'s hooks.
    """

    def __init__(self, model: nn.Module) -> None:
        if not layerwise_supported(model):
            # a shared parameter's hooks would each see one use of it: wrong norms, and
            # clipping by a wrong norm breaks the sensitivity bound
            raise ConfigError(
                "LayerwiseClipping needs a model that layerwise_supported accepts (no "
                "trainable parameter shared between modules); use per_example_gradients "
                "for this model"
            )
        self.model = model
        self.layers = [
            (name, m)
            for name, m in model.named_modules()
            if any(p.requires_grad for p in m.parameters(recurse=False))
        ]
        self._inputs: dict[str, list[torch.Tensor]] = {}
        self._outputs: dict[str, list[tuple[torch.Tensor, int]]] = {}
        #: layer name -> [(input, output gradient)] per call of the layer in the pass
        self._grads: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def forward_backward(
        self,
        inputs: torch.Tensor,
        targets: Callable[[torch.Tensor], torch.Tensor],
        autocast: Callable,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Runs the model on ``inputs``, gets the targets from ``targets(logits)``, and
        back-propagates the summed loss to every layer's output (not to the parameters).
        Returns (per-example losses (B,), logits (B, K), targets), detached."""
        self._inputs, self._outputs, self._grads = {}, {}, {}
        handles = [
            module.register_forward_hook(self._recorder(name)) for name, module in self.layers
        ]
        try:
            with autocast():
                logits = self.model(inputs)
        finally:
            for h in handles:
                h.remove()
        batch = inputs.shape[0]
        for name, _ in self.layers:
            outs = self._outputs.get(name, [])
            if not outs:
                # its parameters may be used functionally, out of the hooks' sight
                raise LayerwiseUnsupported(f"layer {name} did not run in the forward pass")
            for (output, version), layer_input in zip(outs, self._inputs[name], strict=True):
                if output._version != version:
                    raise LayerwiseUnsupported(f"the output of layer {name} was modified in place")
                if layer_input.shape[:1] != (batch,) or output.shape[:1] != (batch,):
                    raise LayerwiseUnsupported(
                        f"layer {name} does not map the batch row by row (input "
                        f"{tuple(layer_input.shape)}, output {tuple(output.shape)}, "
                        f"batch {batch})"
                    )
        batch_targets = targets(logits.detach())
        losses = target_loss(logits, batch_targets, reduction="none")
        names = list(self._outputs)
        flat = [output for n in names for output, _ in self._outputs[n]]
        grads = iter(torch.autograd.grad(losses.sum(), flat, allow_unused=True))
        self._grads = {}
        for n in names:
            calls = [(a, next(grads)) for a in self._inputs[n]]
            # a call whose output did not reach the loss contributes nothing
            calls = [(a, g) for a, g in calls if g is not None]
            if calls:
                self._grads[n] = calls
        self._outputs, self._inputs = {}, {}
        return losses.detach(), logits.detach().float(), batch_targets

    def _recorder(self, name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if len(args) != 1 or not isinstance(output, torch.Tensor):
                raise LayerwiseUnsupported(f"layer {name} was called with {len(args)} inputs")
            self._inputs.setdefault(name, []).append(args[0].detach())
            self._outputs.setdefault(name, []).append((output, output._version))

        return hook

    @_exact_float32()
    def sq_norms(self) -> torch.Tensor:
        """Per-example squared gradient norm over all parameters, (B,), float32 (float64 for a
        float64 model)."""
        total = None
        for name, module in self.layers:
            if name not in self._grads:  # a layer that did not influence the loss
                continue
            part = _followed(calls_sq_norms, module, self._grads[name])
            total = part if total is None else total + part
        if total is None:
            raise RuntimeError("no layer with parameters took part in the forward pass")
        return total.clamp_min(0)  # Gram-matrix norms may round a hair below 0

    @_exact_float32()
    def grad_samples(self) -> dict[str, torch.Tensor]:
        """Every trainable parameter's per-example gradients (name -> (B, *shape), float32,
        or float64 for a float64 model; zeros for a layer that did not reach the loss),
        materialised; releases the stored tensors like :meth:`clipped_sums`."""
        batch = None
        samples: dict[str, torch.Tensor] = {}
        for name, m in self.layers:
            if name in self._grads:
                for pname, value in _followed(calls_grad_samples, m, self._grads[name]).items():
                    samples[_join(name, pname)] = value
                    batch = value.shape[0]
        for name, m in self.layers:
            if name not in self._grads:
                for pname, p in m.named_parameters(recurse=False):
                    if p.requires_grad:
                        samples[_join(name, pname)] = torch.zeros(
                            (batch or 0, *p.shape), dtype=_wide(p).dtype, device=p.device
                        )
        self._grads = {}
        return samples

    @_exact_float32()
    def clipped_sums(self, factors: torch.Tensor) -> dict[str, torch.Tensor]:
        """Σᵢ cᵢ gᵢ for every trainable parameter (name -> tensor of its shape, float32, or
        float64 for a float64 model)."""
        sums: dict[str, torch.Tensor] = {}
        for name, m in self.layers:
            if name not in self._grads:
                for pname, p in m.named_parameters(recurse=False):
                    if p.requires_grad:
                        sums[_join(name, pname)] = torch.zeros_like(p, dtype=_wide(p).dtype)
                continue
            calls = self._grads[name]
            for pname, value in _followed(calls_clipped_sums, m, calls, factors).items():
                sums[_join(name, pname)] = value
        self._grads = {}
        return sums


def _followed(fn: Callable, module: nn.Module, *args: object):
    """``fn(module, *args)``; an error of the torch.func fallback on a layer without a
    formula (a layer drawing random numbers, mixed dtypes under autocast) becomes
    LayerwiseUnsupported, so that DPSGDStep falls back to whole-model torch.func."""
    if formula_supported(module) or registered_grad_sampler(module) is not None:
        return fn(module, *args)
    try:
        return fn(module, *args)
    except RuntimeError as err:
        raise LayerwiseUnsupported(
            f"torch.func on the layer {type(module).__name__} failed: {err}"
        ) from err


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name
