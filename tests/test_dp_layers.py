"""labeldp.dpsgd.layers: DPLSTM/DPGRU/DPRNN and DPMultiheadAttention equal the torch layers
with copied weights (outputs and states), and the hooks' per-example gradients of models
using them (a Linear called once per time step: per-call gradients summed) equal
micro-batching; Opacus' DPLSTM as an oracle of the per-example norms."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from labeldp.dpsgd import GradSampleHooks
from labeldp.dpsgd.layers import DPGRU, DPLSTM, DPRNN, DPMultiheadAttention
from labeldp.errors import ConfigError

RECURRENT = [
    (nn.LSTM, DPLSTM, {}),
    (nn.GRU, DPGRU, {}),
    (nn.RNN, DPRNN, {}),
    (nn.RNN, DPRNN, {"nonlinearity": "relu"}),
]


def _pair(torch_cls, dp_cls, **kw):
    torch.manual_seed(0)
    ref = torch_cls(**kw).double()
    ours = dp_cls(**kw).double()
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _assert_same(a, b):
    if isinstance(a, tuple):
        assert isinstance(b, tuple) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _assert_same(x, y)
    else:
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("torch_cls, dp_cls, extra", RECURRENT)
@pytest.mark.parametrize(
    "shape",
    [
        {"num_layers": 1, "bidirectional": False, "batch_first": True, "bias": True},
        {"num_layers": 2, "bidirectional": True, "batch_first": False, "bias": True},
        {"num_layers": 2, "bidirectional": False, "batch_first": True, "bias": False},
    ],
)
def test_recurrent_forward_equals_torch(torch_cls, dp_cls, extra, shape):
    ref, ours = _pair(torch_cls, dp_cls, input_size=3, hidden_size=4, **shape, **extra)
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    if not shape["batch_first"]:
        x = x.transpose(0, 1).contiguous()
    _assert_same(ref(x), ours(x))
    d = 2 if shape["bidirectional"] else 1
    h0 = torch.randn(shape["num_layers"] * d, 2, 4, dtype=torch.float64)
    hx = (h0, torch.randn_like(h0)) if torch_cls is nn.LSTM else h0
    _assert_same(ref(x, hx), ours(x, hx))
    unbatched = x[:, 0] if not shape["batch_first"] else x[0]
    hx1 = tuple(h[:, 0] for h in hx) if torch_cls is nn.LSTM else hx[:, 0]
    _assert_same(ref(unbatched, hx1), ours(unbatched, hx1))


class SeqModel(nn.Module):
    def __init__(self, rnn: nn.Module) -> None:
        super().__init__()
        self.rnn = rnn
        self.head = nn.Linear(2 * 4, 3)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def micro_batch(model, x, y):
    params = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
    rows = []
    for i in range(x.shape[0]):
        loss = F.cross_entropy(model(x[i : i + 1]), y[i : i + 1], reduction="sum")
        rows.append(torch.autograd.grad(loss, [p for _, p in params]))
    return {k: torch.stack([r[j] for r in rows]) for j, (k, _) in enumerate(params)}


def hooks_grads(model, x, y, reduction="mean"):
    hooks = GradSampleHooks(model, reduction)
    try:
        F.cross_entropy(model(x), y, reduction=reduction).backward()
        return hooks.per_example_gradients(), hooks
    finally:
        hooks.remove()



def assert_hooks_match_micro_batching(model, x, y) -> None:
    """The hooks' per-example gradients equal one backward per example (float64)."""
    want = micro_batch(copy.deepcopy(model), x, y)
    got, _ = hooks_grads(model, x, y)
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-8, atol=1e-10)

@pytest.mark.parametrize("torch_cls, dp_cls, extra", RECURRENT[:3])
def test_recurrent_per_example_gradients_equal_micro_batching(torch_cls, dp_cls, extra):
    torch.manual_seed(1)
    rnn = dp_cls(3, 4, num_layers=2, bidirectional=True, batch_first=True, **extra)
    model = SeqModel(rnn).double()
    x, y = torch.randn(4, 6, 3, dtype=torch.float64), torch.randint(0, 3, (4,))
    assert_hooks_match_micro_batching(model, x, y)


def test_recurrent_clipped_norms_are_of_the_summed_gradient():
    """Clipping uses ‖Σ_t g_t‖ per example (not a sum of per-call norms)."""
    torch.manual_seed(2)
    model = SeqModel(DPGRU(3, 4, bidirectional=True, batch_first=True)).double()
    x, y = torch.randn(5, 4, 3, dtype=torch.float64), torch.randint(0, 3, (5,))
    want = micro_batch(copy.deepcopy(model), x, y)
    norms = torch.sqrt(sum(v.flatten(1).pow(2).sum(1) for v in want.values()))
    hooks = GradSampleHooks(model, "sum")
    try:
        F.cross_entropy(model(x), y, reduction="sum").backward()
        sums, got_norms, batch = hooks.clipped_sums(0.5)
    finally:
        hooks.remove()
    assert batch == 5
    torch.testing.assert_close(got_norms, norms, rtol=1e-8, atol=1e-10)
    factors = (0.5 / (norms + 1e-6)).clamp(max=1)
    for name, p in model.named_parameters():
        expected = torch.tensordot(factors, want[name], dims=1)
        torch.testing.assert_close(sums[p], expected, rtol=1e-8, atol=1e-10)


def test_dplstm_norms_equal_opacus():
    opacus = pytest.importorskip("opacus")
    torch.manual_seed(3)
    ref = nn.LSTM(3, 4, num_layers=2, bidirectional=True, batch_first=True)
    ours = SeqModel(DPLSTM(3, 4, num_layers=2, bidirectional=True, batch_first=True))
    ours.rnn.load_state_dict(ref.state_dict())
    theirs = SeqModel(
        opacus.layers.DPLSTM(3, 4, num_layers=2, bidirectional=True, batch_first=True)
    )
    theirs.rnn.load_state_dict(ref.state_dict())
    theirs.head.load_state_dict(ours.head.state_dict())
    x, y = torch.randn(5, 6, 3), torch.randint(0, 3, (5,))
    gsm = opacus.GradSampleModule(theirs, loss_reduction="sum")
    F.cross_entropy(gsm(x), y, reduction="sum").backward()
    oracle = torch.sqrt(sum(p.grad_sample.flatten(1).pow(2).sum(1) for p in theirs.parameters()))
    got, _ = hooks_grads(ours, x, y, "sum")
    norms = torch.sqrt(sum(v.flatten(1).pow(2).sum(1) for v in got.values()))
    torch.testing.assert_close(norms, oracle, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- attention
ATTENTION = [
    {"batch_first": True},
    {"batch_first": False, "bias": False},
    {"batch_first": True, "add_bias_kv": True, "add_zero_attn": True},
    {"batch_first": True, "kdim": 5, "vdim": 3},
]


@pytest.mark.parametrize("kw", ATTENTION)
@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")
def test_attention_forward_equals_torch(kw):
    torch.manual_seed(4)
    ref = nn.MultiheadAttention(8, 2, **kw).double()
    ours = DPMultiheadAttention(8, 2, **kw).double()
    ours.load_state_dict(ref.state_dict())
    b, lq, s = 3, 4, 5
    q = torch.randn(b, lq, 8, dtype=torch.float64)
    k = torch.randn(b, s, kw.get("kdim", 8), dtype=torch.float64)
    v = torch.randn(b, s, kw.get("vdim", 8), dtype=torch.float64)
    if not kw["batch_first"]:
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))
    padding = torch.zeros(b, s, dtype=torch.bool)
    padding[0, -2:] = True
    causal = torch.ones(lq, s, dtype=torch.bool).triu(1)
    for extra in (
        {},
        {"key_padding_mask": padding},
        {"attn_mask": causal, "average_attn_weights": False},
        {"attn_mask": torch.randn(lq, s, dtype=torch.float64), "key_padding_mask": padding},
        {"need_weights": False},
    ):
        _assert_same(ref(q, k, v, **extra), ours(q, k, v, **extra))
    # unbatched
    q1, k1, v1 = (t[0] if kw["batch_first"] else t[:, 0] for t in (q, k, v))
    _assert_same(ref(q1, k1, v1), ours(q1, k1, v1))


class AttnModel(nn.Module):
    def __init__(self, **kw) -> None:
        super().__init__()
        self.attn = DPMultiheadAttention(8, 2, batch_first=True, **kw)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        out, _ = self.attn(x, x, x)
        return self.head(out.mean(1))


@pytest.mark.parametrize("kw", [{}, {"add_bias_kv": True}])
def test_attention_per_example_gradients_equal_micro_batching(kw):
    torch.manual_seed(5)
    model = AttnModel(**kw).double()
    x, y = torch.randn(4, 5, 8, dtype=torch.float64), torch.randint(0, 3, (4,))
    assert_hooks_match_micro_batching(model, x, y)


def test_bad_arguments_name_the_parameter():
    with pytest.raises(ConfigError, match="proj_size"):
        DPLSTM(3, 4, proj_size=2)
    with pytest.raises(ConfigError, match="hidden_size must be an integer ≥ 1"):
        DPGRU(3, 0)
    with pytest.raises(ConfigError, match=r"dropout must be a number in \[0, 1\]"):
        DPRNN(3, 4, dropout=2.0)
    with pytest.raises(ConfigError, match="nonlinearity"):
        DPRNN(3, 4, nonlinearity="sigmoid")
    with pytest.raises(ConfigError, match="divisible by num_heads"):
        DPMultiheadAttention(6, 4)
    packed = nn.utils.rnn.pack_sequence([torch.randn(3, 2)])
    with pytest.raises(ConfigError, match="PackedSequence"):
        DPLSTM(2, 4)(packed)


# ------------------------------------------------------------------------ validate / fix
class Mixed(nn.Module):
    """BatchNorm, LSTM, GRU and attention: everything fix replaces."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm1d(4)
        self.lstm = nn.LSTM(4, 4, batch_first=True, bidirectional=True)
        self.gru = nn.GRU(8, 4, num_layers=2)
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x):  # x: (B, 3, T)
        h = torch.tanh(self.bn(self.conv(x))).transpose(1, 2)  # (B, T, 4)
        h, _ = self.lstm(h)
        h, _ = self.gru(h.transpose(0, 1))
        h = h.transpose(0, 1)
        h, _ = self.attn(h, h, h, need_weights=False)
        return self.head(h.mean(1))


def test_fix_replaces_recurrent_and_attention_layers_keeping_the_function():
    from labeldp.dpsgd import fix, make_private, validate

    torch.manual_seed(6)
    model = Mixed()
    model.gru.weight_hh_l1.requires_grad_(False)
    problems = validate(model)
    for name in ("bn", "lstm", "gru", "attn"):
        assert any(line.startswith(f"{name} (") for line in problems), (name, problems)
    x = torch.randn(6, 3, 5)
    twin = Mixed()
    twin.load_state_dict(model.state_dict())
    fixed = fix(model)
    assert fixed is model and validate(model) == []
    assert isinstance(model.lstm, DPLSTM) and isinstance(model.gru, DPGRU)
    assert isinstance(model.attn, DPMultiheadAttention) and isinstance(model.bn, nn.GroupNorm)
    assert not model.gru.cells[1].hh.weight.requires_grad  # layer 1: hidden weights
    # the recurrent and attention layers compute what they did (BatchNorm is replaced)
    h = torch.randn(6, 5, 4)
    twin.eval(), model.eval()
    torch.testing.assert_close(model.lstm(h)[0], twin.lstm(h)[0], rtol=1e-5, atol=1e-6)
    h8 = torch.randn(5, 6, 8)
    torch.testing.assert_close(model.gru(h8)[1], twin.gru(h8)[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.attn(h, h, h)[0], twin.attn(h, h, h)[0], rtol=1e-5, atol=1e-6)
    model.train()
    # and the fixed model trains under make_private (the first step checks the hooks'
    # per-example sum against autograd)
    data = torch.utils.data.TensorDataset(x, torch.randint(0, 3, (6,)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer, loader = make_private(
        model,
        optimizer,
        torch.utils.data.DataLoader(data, batch_size=3),
        max_grad_norm=1.0,
        noise_multiplier=0.5,
        delta=1e-5,
        seed=0,
    )
    for xb, yb in loader:
        optimizer.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        optimizer.step()
    assert optimizer.steps == len(loader)


def test_lstm_with_projections_is_left_and_listed():
    from labeldp.dpsgd import fix, validate

    model = nn.Sequential(nn.LSTM(3, 4, proj_size=2))
    fix(model)
    assert isinstance(model[0], nn.LSTM) and any("LSTM" in line for line in validate(model))
    assert isinstance(fix(nn.GRU(3, 4)), DPGRU)  # the model itself replaced
