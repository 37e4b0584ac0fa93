"""DP-compatible recurrent and attention layers: nn.LSTM/GRU/RNN and nn.MultiheadAttention
rebuilt from nn.Linear layers, so that :mod:`labeldp.dpsgd`'s hooks see every parameter
through the Linear formula of :mod:`labeldp.train.per_example`.

PyTorch's fused recurrent kernels and attention keep their weights outside any layer whose
per-example gradient has a formula. Here each layer and direction of a recurrent network
is a :class:`RecurrentCell` of two Linears: ``ih`` (input to gates, called once on the
whole sequence) and ``hh`` (hidden state to gates, called once per time step, T calls per
forward). The hooks sum a layer's per-call gradients per example (the norm clipped is
that of the sum: the T calls of ``hh`` are stacked along the sequence dimension, which is
exactly Σ_t g_tᵀ h_{t-1}). Attention has ``q_proj``, ``k_proj``, ``v_proj`` and
``out_proj`` Linears, and :class:`SequenceBias` (with a registered grad sampler) for
``add_bias_kv``.

Contracts: the same constructor arguments, forward arguments and outputs as the torch
layers (``batch_first``, ``num_layers``, ``bidirectional``, inter-layer ``dropout``,
unbatched inputs, the (output, state) pair; attention's masks, ``need_weights``,
``average_attn_weights``). Not supported (ConfigError): PackedSequence inputs, LSTM
``proj_size`` > 0. ``load_state_dict`` accepts the torch layer's state dict (its
parameter names are mapped), so ``DPLSTM(...).load_state_dict(lstm.state_dict())`` copies
the weights; :func:`labeldp.dpsgd.fix` does this. Shapes: B batch, T (L, S) sequence
lengths, H hidden size, E embedding size, D = 2 if bidirectional else 1.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from ..errors import ConfigError
from ..train.per_example import register_grad_sampler

_GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}


def _check_int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name} must be an integer ≥ {low}, got {value!r}")
    return value


def _check_dropout(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ConfigError(f"dropout must be a number in [0, 1], got {value!r}")
    return float(value)


class RecurrentCell(nn.Module):
    """One layer and direction of a recurrent network: ``ih`` (input_size -> gates·H) and
    ``hh`` (H -> gates·H) Linears, gates 4 (LSTM: i, f, g, o), 3 (GRU: r, z, n) or 1 (RNN),
    in PyTorch's gate order."""

    def __init__(self, input_size: int, hidden_size: int, gates: int, bias: bool, **kw) -> None:
        super().__init__()
        self.ih = nn.Linear(input_size, gates * hidden_size, bias=bias, **kw)
        self.hh = nn.Linear(hidden_size, gates * hidden_size, bias=bias, **kw)


class _DPRecurrent(nn.Module):
    mode = "LSTM"

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.input_size = _check_int("input_size", input_size, 1)
        self.hidden_size = _check_int("hidden_size", hidden_size, 1)
        self.num_layers = _check_int("num_layers", num_layers, 1)
        self.bias = bool(bias)
        self.batch_first = bool(batch_first)
        self.dropout = _check_dropout(dropout)
        self.bidirectional = bool(bidirectional)
        directions = 2 if bidirectional else 1
        gates = _GATES[self.mode]
        self.cells = nn.ModuleList(
            RecurrentCell(
                input_size if layer == 0 else directions * hidden_size,
                hidden_size,
                gates,
                self.bias,
                device=device,
                dtype=dtype,
            )
            for layer in range(num_layers)
            for _ in range(directions)
        )
        self.reset_parameters()
        self._register_load_state_dict_pre_hook(self._rename_torch_keys)

    def reset_parameters(self) -> None:
        """Uniform(-1/√H, 1/√H) for every weight and bias, as PyTorch's recurrent layers."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def _torch_names(self) -> dict[str, str]:
        """PyTorch's parameter name -> ours."""
        directions = 2 if self.bidirectional else 1
        names = {}
        for layer in range(self.num_layers):
            for d in range(directions):
                suffix = f"_l{layer}" + ("_reverse" if d else "")
                i = layer * directions + d
                for part in ("ih", "hh"):
                    names[f"weight_{part}{suffix}"] = f"cells.{i}.{part}.weight"
                    if self.bias:
                        names[f"bias_{part}{suffix}"] = f"cells.{i}.{part}.bias"
        return names

    def _rename_torch_keys(self, state_dict: dict, prefix: str, *args: object) -> None:
        for theirs, ours in self._torch_names().items():
            if prefix + theirs in state_dict:
                state_dict[prefix + ours] = state_dict.pop(prefix + theirs)

    def _step(self, cell: RecurrentCell, gi: torch.Tensor, state: tuple) -> tuple:
        """One time step from the input's gate pre-activations gi (B, gates·H)."""
        h = state[0]
        gh = cell.hh(h)
        if self.mode == "LSTM":
            i, f, g, o = (gi + gh).chunk(4, dim=1)
            c = torch.sigmoid(f) * state[1] + torch.sigmoid(i) * torch.tanh(g)
            return torch.sigmoid(o) * torch.tanh(c), c
        if self.mode == "GRU":
            ir, iz, in_ = gi.chunk(3, dim=1)
            hr, hz, hn = gh.chunk(3, dim=1)
            r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
            n = torch.tanh(in_ + r * hn)
            return ((1 - z) * n + z * h,)
        act = torch.tanh if self.mode == "RNN_TANH" else torch.relu
        return (act(gi + gh),)

    def forward(self, input: torch.Tensor, hx: object = None) -> tuple:
        """input: (B, T, input_size) if batch_first else (T, B, input_size), or unbatched
        (T, input_size). hx: None (zeros), or the initial state (LSTM: (h0, c0)), each
        (D·num_layers, B, H) ((D·num_layers, H) unbatched). Returns (output (B, T, D·H) /
        (T, B, D·H) / (T, D·H), final state of the hx's shapes)."""
        if isinstance(input, PackedSequence):
            raise ConfigError(
                f"{type(self).__name__} does not take a PackedSequence; pad the batch "
                "(torch.nn.utils.rnn.pad_packed_sequence) and mask the loss instead"
            )
        if input.dim() not in (2, 3):
            raise ConfigError(
                f"{type(self).__name__} input must be 2-D (unbatched) or 3-D, got shape "
                f"{tuple(input.shape)}"
            )
        batched = input.dim() == 3
        x = input if batched else input.unsqueeze(1 if not self.batch_first else 0)
        if not self.batch_first:
            x = x.transpose(0, 1)  # (B, T, F): the hooks read the batch in dim 0
        b = x.shape[0]
        directions = 2 if self.bidirectional else 1
        lstm = self.mode == "LSTM"
        if hx is None:
            zeros = x.new_zeros(self.num_layers * directions, b, self.hidden_size)
            states = (zeros, zeros) if lstm else (zeros,)
        else:
            states = tuple(hx) if lstm else (hx,)
            if not batched:
                states = tuple(s.unsqueeze(1) for s in states)
        finals: list[tuple] = []
        for layer in range(self.num_layers):
            outputs = []
            for d in range(directions):
                i = layer * directions + d
                cell = self.cells[i]
                gates = cell.ih(x)  # (B, T, gates·H): one call for the whole sequence
                state = tuple(s[i] for s in states)
                steps = range(x.shape[1] - 1, -1, -1) if d else range(x.shape[1])
                hs: list[torch.Tensor] = [x] * x.shape[1]  # placeholders
                for t in steps:
                    state = self._step(cell, gates[:, t], state)
                    hs[t] = state[0]
                outputs.append(torch.stack(hs, 1))
                finals.append(state)
            x = torch.cat(outputs, 2) if directions == 2 else outputs[0]
            if self.dropout and self.training and layer < self.num_layers - 1:
                x = F.dropout(x, self.dropout, training=True)
        out = x if self.batch_first else x.transpose(0, 1)
        final = tuple(torch.stack([f[k] for f in finals]) for k in range(len(finals[0])))
        if not batched:
            out = out.squeeze(0 if self.batch_first else 1)
            final = tuple(s.squeeze(1) for s in final)
        return out, (final if lstm else final[0])

    def extra_repr(self) -> str:
        return (
            f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, "
            f"bias={self.bias}, batch_first={self.batch_first}, dropout={self.dropout}, "
            f"bidirectional={self.bidirectional}"
        )


class DPLSTM(_DPRecurrent):
    """nn.LSTM's contract (without proj_size) from Linear cells; see the module docstring.
    forward returns (output, (h_n, c_n))."""

    mode = "LSTM"

    def __init__(self, *args: object, proj_size: int = 0, **kwargs: object) -> None:
        if proj_size != 0:
            raise ConfigError(f"DPLSTM supports proj_size = 0 only, got {proj_size!r}")
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]


class DPGRU(_DPRecurrent):
    """nn.GRU's contract from Linear cells; forward returns (output, h_n)."""

    mode = "GRU"


class DPRNN(_DPRecurrent):
    """nn.RNN's contract (nonlinearity "tanh" or "relu") from Linear cells; forward
    returns (output, h_n)."""

    def __init__(self, *args: object, nonlinearity: str = "tanh", **kwargs: object) -> None:
        if nonlinearity not in ("tanh", "relu"):
            raise ConfigError(f"nonlinearity must be one of 'tanh', 'relu', got {nonlinearity!r}")
        self.mode = "RNN_TANH" if nonlinearity == "tanh" else "RNN_RELU"
        self.nonlinearity = nonlinearity
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- attention
class SequenceBias(nn.Module):
    """Appends a learned vector to a (B, S, E) sequence: (B, S + 1, E). The bias has
    nn.MultiheadAttention's bias_k/bias_v shape (1, 1, E)."""

    def __init__(self, embed_dim: int, **kw: object) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.empty(1, 1, embed_dim, **kw))  # type: ignore[arg-type]
        nn.init.xavier_normal_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.bias.expand(x.shape[0], 1, -1)], 1)


@register_grad_sampler(SequenceBias)
def _sequence_bias_samples(layer: SequenceBias, activations: tuple, grad: torch.Tensor):
    """The per-example gradient of the appended vector is its position's output gradient."""
    return {"bias": grad[:, -1].reshape(grad.shape[0], 1, 1, -1)}


class DPMultiheadAttention(nn.Module):
    """nn.MultiheadAttention's contract (constructor, forward, outputs) from Linear
    projections ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``; see the module docstring.

    forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
    average_attn_weights=True, is_causal=False) -> (attn_output (B, L, E) if batch_first
    else (L, B, E), or (L, E) unbatched; weights (B, L, S) averaged over heads, (B, heads,
    L, S) otherwise, or None when need_weights is False). Masks as in PyTorch: boolean
    True = not allowed, float masks added to the scores; attn_mask (L, S) or (B·heads, L,
    S), key_padding_mask (B, S). ``is_causal`` is a hint that attn_mask is causal (an
    attn_mask is required with it, as in PyTorch)."""

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.embed_dim = _check_int("embed_dim", embed_dim, 1)
        self.num_heads = _check_int("num_heads", num_heads, 1)
        if embed_dim % num_heads:
            raise ConfigError(
                f"embed_dim must be divisible by num_heads, got {embed_dim} and {num_heads}"
            )
        self.head_dim = embed_dim // num_heads
        self.kdim = embed_dim if kdim is None else _check_int("kdim", kdim, 1)
        self.vdim = embed_dim if vdim is None else _check_int("vdim", vdim, 1)
        self.dropout = _check_dropout(dropout)
        self.batch_first = bool(batch_first)
        self.add_zero_attn = bool(add_zero_attn)
        kw = {"device": device, "dtype": dtype}
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **kw)
        self.k_proj = nn.Linear(self.kdim, embed_dim, bias=bias, **kw)
        self.v_proj = nn.Linear(self.vdim, embed_dim, bias=bias, **kw)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **kw)
        self.bias_k = SequenceBias(embed_dim, **kw) if add_bias_kv else None
        self.bias_v = SequenceBias(embed_dim, **kw) if add_bias_kv else None
        self._reset_parameters()
        self._register_load_state_dict_pre_hook(self._rename_torch_keys)

    def _reset_parameters(self) -> None:
        """As nn.MultiheadAttention: Xavier-uniform projections (of the stacked 3E × E
        matrix when kdim = vdim = E), zero biases."""
        same = self.kdim == self.vdim == self.embed_dim
        for lin in (self.q_proj, self.k_proj, self.v_proj):
            if same:
                bound = math.sqrt(6.0 / (4 * self.embed_dim))
                nn.init.uniform_(lin.weight, -bound, bound)
            else:
                nn.init.xavier_uniform_(lin.weight)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
        if self.out_proj.bias is not None:
            nn.init.zeros_(self.out_proj.bias)

    def _rename_torch_keys(self, state_dict: dict, prefix: str, *args: object) -> None:
        for part in ("weight", "bias"):
            key = f"{prefix}in_proj_{part}"
            if key in state_dict:
                q, k, v = state_dict.pop(key).chunk(3, dim=0)
                for name, value in zip(("q", "k", "v"), (q, k, v), strict=True):
                    state_dict[f"{prefix}{name}_proj.{part}"] = value
        for name in ("q", "k", "v"):
            key = f"{prefix}{name}_proj_weight"
            if key in state_dict:
                state_dict[f"{prefix}{name}_proj.weight"] = state_dict.pop(key)
        for name in ("bias_k", "bias_v"):
            if f"{prefix}{name}" in state_dict:
                state_dict[f"{prefix}{name}.bias"] = state_dict.pop(f"{prefix}{name}")

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if is_causal and attn_mask is None:
            raise ConfigError("is_causal needs attn_mask (it is a hint, as in PyTorch)")
        batched = query.dim() == 3
        if not batched:
            query, key, value = (t.unsqueeze(0) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        b, length, e = query.shape[0], query.shape[1], self.embed_dim
        heads, hd = self.num_heads, self.head_dim
        q, k, v = self.q_proj(query), self.k_proj(key), self.v_proj(value)  # batch in dim 0
        extra = 0
        if self.bias_k is not None and self.bias_v is not None:
            k, v, extra = self.bias_k(k), self.bias_v(v), extra + 1
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(b, 1, e)], 1)
            v = torch.cat([v, v.new_zeros(b, 1, e)], 1)
            extra += 1
        src = k.shape[1]
        q = q.reshape(b, length, heads, hd).transpose(1, 2) * (1.0 / math.sqrt(hd))
        k = k.reshape(b, src, heads, hd).transpose(1, 2)
        v = v.reshape(b, src, heads, hd).transpose(1, 2)
        scores = q @ k.transpose(2, 3)  # (B, heads, L, S)
        mask = self._mask(attn_mask, key_padding_mask, b, length, extra, scores.dtype)
        if mask is not None:
            scores = scores + mask
        weights = torch.softmax(scores, dim=-1)
        if self.dropout and self.training:
            weights = F.dropout(weights, self.dropout, training=True)
        out = (weights @ v).transpose(1, 2).reshape(b, length, e)
        out = self.out_proj(out)
        if not batched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        if average_attn_weights:
            weights = weights.mean(1)
        return out, (weights if batched else weights.squeeze(0))

    def _mask(self, attn_mask, key_padding_mask, b, length, extra, dtype):
        """One additive float mask broadcastable to (B, heads, L, S + extra), or None."""

        def additive(m: torch.Tensor) -> torch.Tensor:
            if m.dtype == torch.bool:
                return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(
                    m, float("-inf")
                )
            return m.to(dtype)

        total = None
        if attn_mask is not None:
            m = additive(attn_mask)
            if m.dim() == 3:  # (B·heads, L, S)
                m = m.reshape(b, self.num_heads, length, -1)
            m = F.pad(m, (0, extra))
            total = m
        if key_padding_mask is not None:
            m = F.pad(additive(key_padding_mask), (0, extra))[:, None, None, :]
            total = m if total is None else total + m
        return total
