"""What a model must be for DP-SGD's per-example gradients, and the usual fix.

:func:`validate` lists, one line per problem naming the layer, what stops a model from
having per-example gradients through :mod:`labeldp.dpsgd`'s hooks:

- layers with batch statistics (BatchNorm, SyncBatchNorm; InstanceNorm that normalizes by
  running statistics in training): one example's output depends on the others, so no
  per-example gradient exists — :func:`fix` replaces BatchNorm by GroupNorm;
- layers whose output is not one tensor (RNN, LSTM, GRU, MultiheadAttention, Transformer
  blocks with their own parameters): the hooks capture one output gradient per call;
- a trainable parameter shared by two modules (tied weights): each module records its
  own use only.

Every other module with trainable parameters is fine: Linear, Conv2d (groups 1, zero
padding), GroupNorm and Embedding through closed-form per-layer formulas, anything else
(LayerNorm, grouped convolutions, custom modules) through torch.func on that layer alone,
which needs the layer to treat the rows of its input independently and draw no random
numbers (checked at run time: the first step compares the per-example gradients' sum with
autograd's gradient).
"""

from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from ..errors import ConfigError
from ..models.norm import convert_batchnorm_to_groupnorm

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
    (labeldp.models.convert_batchnorm_to_groupnorm); returns the model. Call it before
    building the optimizer: the optimizer must hold the new layers' parameters. Problems
    :func:`validate` reports that have no automatic fix are left (check it again)."""
    return convert_batchnorm_to_groupnorm(model)
