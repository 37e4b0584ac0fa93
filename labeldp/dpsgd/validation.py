"""What a model must be for DP-SGD's per-example gradients, and the usual fix.

:func:`validate` lists, one line per problem naming the layer, what stops a model from
having per-example gradients through :mod:`labeldp.dpsgd`'s hooks:

- layers with batch statistics (BatchNorm, SyncBatchNorm; InstanceNorm that normalizes by
  running statistics in training): one example's output depends on the others, so no
  per-example gradient exists — :func:`fix` replaces BatchNorm by GroupNorm;
- PyTorch's fused recurrent layers and attention (RNN, LSTM, GRU, MultiheadAttention,
  Transformer): their output is not one tensor and their weights sit in fused kernels —
  :func:`fix` replaces nn.LSTM/GRU/RNN and nn.MultiheadAttention by
  :mod:`labeldp.dpsgd.layers`' DPLSTM/DPGRU/DPRNN/DPMultiheadAttention (built from
  Linears), copying the weights; LSTM with ``proj_size`` > 0 has no DP form;
- a trainable parameter shared by two modules (tied weights): each module records its
  own use only.

Every other module with trainable parameters is fine: Linear, Conv1d/2d/3d, GroupNorm,
LayerNorm, InstanceNorm and Embedding through closed-form per-layer formulas, layer types
with a registered grad sampler (:func:`labeldp.dpsgd.register_grad_sampler`) through it,
anything else (custom modules) through torch.func on that layer alone, which needs the
layer to treat the rows of its input independently and draw no random numbers (checked
at run time: the first step compares the per-example gradients' sum with autograd's
gradient).
"""

from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from ..errors import ConfigError
from ..models.norm import convert_batchnorm_to_groupnorm
from .layers import DPGRU, DPLSTM, DPRNN, DPMultiheadAttention

#: Layers with parameters whose output is not a single tensor or mixes sequence steps in
#: ways the hooks do not follow.
UNSUPPORTED = (nn.RNNBase, nn.MultiheadAttention, nn.Transformer)


def validate(model: nn.Module) -> list[str]:
    """The reasons ``model`` cannot be trained by :func:`labeldp.dpsgd.make_private`, one
    line per problem naming the layer (empty: the model is fine)."""
    problems: list[str] = []
    for name, module in model.named_modules():
        label = name or "<model>"
        if isinstance(module, _BatchNorm):
            problems.append(
                f"{label} ({type(module).__name__}): batch statistics mix the examples of a "
                "batch; replace it by GroupNorm (labeldp.dpsgd.fix(model))"
            )
        elif isinstance(module, _InstanceNorm) and module.track_running_stats:
            problems.append(
                f"{label} ({type(module).__name__}): running statistics carry information "
                "between examples; use track_running_stats=False or GroupNorm"
            )
        elif isinstance(module, UNSUPPORTED) and any(p.requires_grad for p in module.parameters()):
            problems.append(
                f"{label} ({type(module).__name__}): not supported (its output is not one "
                "tensor, or its parameters are used outside the hooks' sight)"
            )
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if p.requires_grad:
                owners.setdefault(id(p), []).append(f"{name}.{pname}" if name else pname)
    for names in owners.values():
        if len(names) > 1:
            problems.append(
                f"{' and '.join(names)}: one parameter shared by several modules (tied "
                "weights); each module's hook sees only its own use of it"
            )
    return problems


def check(model: nn.Module) -> None:
    """ConfigError listing :func:`validate`'s problems, if any."""
    problems = validate(model)
    if problems:
        raise ConfigError("this model cannot be trained with DP-SGD: " + "; ".join(problems))


def fix(model: nn.Module) -> nn.Module:
    """Replaces, in place, every BatchNorm layer by a GroupNorm of the same channels
    (labeldp.models.convert_batchnorm_to_groupnorm), and every nn.LSTM (proj_size 0),
    nn.GRU, nn.RNN and nn.MultiheadAttention (exact types) by its DP form from
    :mod:`labeldp.dpsgd.layers` with the same settings, weights, device, dtype,
    requires_grad flags and training mode; returns the model (a new object only if
    ``model`` itself was replaced). Call it before building the optimizer: the optimizer
    must hold the new layers' parameters. Problems :func:`validate` reports that have no
    automatic fix are left (check it again)."""
    model = convert_batchnorm_to_groupnorm(model)
    replaced = _dp_form(model)
    if replaced is not None:
        return replaced
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            new = _dp_form(child)
            if new is not None:
                setattr(parent, name, new)
    return model


def _dp_form(module: nn.Module) -> nn.Module | None:
    """The DP form of ``module`` with its weights, or None if it has none."""
    kind = type(module)
    if kind in (nn.LSTM, nn.GRU, nn.RNN):
        if getattr(module, "proj_size", 0):
            return None
        cls = {nn.LSTM: DPLSTM, nn.GRU: DPGRU, nn.RNN: DPRNN}[kind]
        extra = {"nonlinearity": module.nonlinearity} if kind is nn.RNN else {}
        new: nn.Module = cls(
            module.input_size,
            module.hidden_size,
            num_layers=module.num_layers,
            bias=module.bias,
            batch_first=module.batch_first,
            dropout=float(module.dropout),
            bidirectional=module.bidirectional,
            **extra,
        )
        frozen = {
            ours
            for theirs, ours in new._torch_names().items()
            if not getattr(module, theirs).requires_grad
        }
    elif kind is nn.MultiheadAttention:
        new = DPMultiheadAttention(
            module.embed_dim,
            module.num_heads,
            dropout=float(module.dropout),
            bias=module.out_proj.bias is not None,
            add_bias_kv=module.bias_k is not None,
            add_zero_attn=module.add_zero_attn,
            kdim=module.kdim,
            vdim=module.vdim,
            batch_first=module.batch_first,
        )
        frozen = set()
        for name, p in module.named_parameters():
            if not p.requires_grad:
                frozen |= _MHA_NAMES.get(name, {name})
    else:
        return None
    reference = next(module.parameters(), None)
    if reference is not None:
        new.to(device=reference.device, dtype=reference.dtype)
    new.load_state_dict(module.state_dict())
    for name, p in new.named_parameters():
        p.requires_grad_(name not in frozen)
    return new.train(module.training)


#: nn.MultiheadAttention parameter -> DPMultiheadAttention's.
_MHA_NAMES = {
    "in_proj_weight": {"q_proj.weight", "k_proj.weight", "v_proj.weight"},
    "in_proj_bias": {"q_proj.bias", "k_proj.bias", "v_proj.bias"},
    "q_proj_weight": {"q_proj.weight"},
    "k_proj_weight": {"k_proj.weight"},
    "v_proj_weight": {"v_proj.weight"},
    "bias_k": {"bias_k.bias"},
    "bias_v": {"bias_v.bias"},
}
