"""Per-layer formulas of labeldp.train.per_example for Conv1d/2d/3d (groups, stride,
dilation, numeric and string padding, every padding mode), LayerNorm and InstanceNorm:
materialized per-example gradients, squared norms and clipped sums against one backward
pass per example (float64), and the registration decorator with a user-defined layer."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from labeldp.dpsgd import register_grad_sampler
from labeldp.errors import ConfigError
from labeldp.train.per_example import (
    formula_supported,
    layer_clipped_sums,
    layer_grad_samples,
    layer_sq_norms,
    unfold2d,
    unfold_nd,
)

FAST = settings(max_examples=15, deadline=None, derandomize=True)


def micro_batch(layer: nn.Module, x: torch.Tensor, g: torch.Tensor) -> dict[str, torch.Tensor]:
    """Gradient of <layer(x_i), g_i> for each example alone: name -> (B, *shape)."""
    params = {n: p for n, p in layer.named_parameters() if p.requires_grad}
    rows = []
    for i in range(x.shape[0]):
        out = layer(x[i : i + 1])
        grads = torch.autograd.grad((out * g[i : i + 1]).sum(), list(params.values()))
        rows.append(dict(zip(params, grads, strict=True)))
    return {n: torch.stack([r[n] for r in rows]) for n in params}


def check_layer(layer: nn.Module, x: torch.Tensor) -> None:
    """grad samples, squared norms and clipped sums of ``layer`` equal micro-batching."""
    layer = layer.double()
    x = x.double()
    with torch.no_grad():
        out = layer(x)
    g = torch.randn_like(out)
    want = micro_batch(layer, x, g)
    ours = layer_grad_samples(layer, x, g)
    assert set(ours) == set(want)
    for n in want:
        torch.testing.assert_close(ours[n], want[n], rtol=1e-9, atol=1e-11)
    sq = sum(v.flatten(1).pow(2).sum(1) for v in want.values())
    torch.testing.assert_close(layer_sq_norms(layer, x, g), sq, rtol=1e-9, atol=1e-11)
    factors = torch.rand(x.shape[0], dtype=torch.float64)
    sums = layer_clipped_sums(layer, x, g, factors)
    for n, v in want.items():
        torch.testing.assert_close(
            sums[n], torch.tensordot(factors, v, dims=1), rtol=1e-9, atol=1e-11
        )


@st.composite
def conv_cases(draw):
    n = draw(st.integers(1, 3))
    groups = draw(st.sampled_from([1, 2]))
    cin, cout = groups * draw(st.integers(1, 2)), groups * draw(st.integers(1, 2))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(n))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(n))
    stride = tuple(draw(st.integers(1, 2)) for _ in range(n))
    mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    if stride == (1,) * n and draw(st.booleans()):
        padding = draw(st.sampled_from(["same", "valid"]))
    else:
        padding = tuple(draw(st.integers(0, 2)) for _ in range(n))
    bias = draw(st.booleans())
    size = 6 if n < 3 else 5
    if mode in ("reflect", "circular") and not isinstance(padding, str):
        padding = tuple(min(p, size - 1) for p in padding)
    cls = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[n - 1]
    layer = cls(
        cin,
        cout,
        kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        bias=bias,
        padding_mode=mode,
    )
    batch = draw(st.integers(1, 3))
    return layer, (batch, cin, *([size] * n))


@FAST
@given(conv_cases(), st.integers(0, 2**16))
@pytest.mark.filterwarnings("ignore:Using padding='same'")
def test_convolutions_equal_micro_batching(case, seed):
    layer, shape = case
    torch.manual_seed(seed)
    assert formula_supported(layer)
    try:
        layer.double()(torch.randn(shape, dtype=torch.float64))
    except RuntimeError:  # a window larger than the (padded) input: torch refuses too
        return
    check_layer(layer, torch.randn(shape))


def test_unfold_nd_equals_unfold2d():
    a = torch.randn(2, 3, 7, 6)
    for args in [((3, 2), (1, 2), (1, 0), (2, 1)), ((1, 1), (1, 1), (0, 0), (1, 1))]:
        torch.testing.assert_close(unfold_nd(a, *args), unfold2d(a, *args), rtol=0, atol=0)


@pytest.mark.parametrize(
    "layer, shape",
    [
        (nn.LayerNorm(5), (4, 5)),
        (nn.LayerNorm(5), (3, 7, 5)),  # a sequence: Σ over positions
        (nn.LayerNorm((3, 4)), (3, 2, 3, 4)),
        (nn.LayerNorm(5, bias=False), (4, 5)),
        (nn.InstanceNorm1d(3, affine=True), (4, 3, 6)),
        (nn.InstanceNorm2d(3, affine=True), (2, 3, 4, 5)),
        (nn.InstanceNorm3d(2, affine=True), (2, 2, 3, 3, 3)),
        (nn.GroupNorm(2, 4), (3, 4, 5)),
    ],
)
def test_norm_layers_equal_micro_batching(layer, shape):
    torch.manual_seed(1)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()
    assert formula_supported(layer)
    check_layer(layer, torch.randn(shape))


def test_frozen_parameters_are_left_out():
    torch.manual_seed(2)
    layer = nn.Conv1d(4, 4, 3, groups=2, padding="same", padding_mode="reflect")
    layer.bias.requires_grad_(False)
    check_layer(layer, torch.randn(3, 4, 7))
    norm = nn.LayerNorm(4)
    norm.weight.requires_grad_(False)
    check_layer(norm, torch.randn(3, 4))


def test_running_statistics_instance_norm_has_no_formula():
    assert not formula_supported(nn.InstanceNorm2d(3, affine=True, track_running_stats=True))


# ------------------------------------------------------------- registered grad samplers
class Gate(nn.Module):
    """A user-defined layer: x * sigmoid(w) + b, elementwise over the last dim."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(d))
        self.b = nn.Parameter(torch.randn(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.w) + self.b


CALLS = []


@register_grad_sampler(Gate)
def _gate_samples(layer: Gate, activations: tuple, grad: torch.Tensor) -> dict:
    CALLS.append(type(layer).__name__)
    (x,) = activations
    s = torch.sigmoid(layer.w)
    dims = tuple(range(1, x.dim() - 1))
    w = (grad * x * s * (1 - s)).sum(dims) if dims else grad * x * s * (1 - s)
    b = grad.sum(dims) if dims else grad
    return {"w": w, layer.b: b}  # a name or the parameter itself


def test_registered_grad_sampler_is_used_and_exact():
    torch.manual_seed(3)
    CALLS.clear()
    check_layer(Gate(4), torch.randn(5, 3, 4))
    assert CALLS and not formula_supported(Gate(4))


def test_registered_grad_sampler_used_by_the_hooks_and_layerwise_clipping():
    from contextlib import nullcontext

    import torch.nn.functional as F

    from labeldp.dpsgd import GradSampleHooks
    from labeldp.train.per_example import LayerwiseClipping, per_example_gradients

    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 4), Gate(4), nn.Linear(4, 2)).double()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 2, (6,))
    want, _, _ = per_example_gradients(model, x, y)
    CALLS.clear()
    hooks = GradSampleHooks(model, "sum")
    try:
        F.cross_entropy(model(x), y, reduction="sum").backward()
        got = hooks.per_example_gradients()
    finally:
        hooks.remove()
    assert CALLS
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-9, atol=1e-12)
    CALLS.clear()
    lc = LayerwiseClipping(model)
    lc.forward_backward(x, lambda _: y, nullcontext)
    norms = sum(v.flatten(1).pow(2).sum(1) for v in want.values())
    torch.testing.assert_close(lc.sq_norms(), norms, rtol=1e-9, atol=1e-12)
    lc.clipped_sums(torch.ones(6, dtype=torch.float64))
    assert CALLS


def test_register_grad_sampler_checks_its_input_and_the_answer():
    with pytest.raises(ConfigError, match="nn.Module subclasses"):
        register_grad_sampler(int)
    with pytest.raises(ConfigError, match="at least one layer type"):
        register_grad_sampler()

    class Bad(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return x * self.w

    @register_grad_sampler(Bad)
    def _bad(layer, activations, grad):
        return {"w": grad.sum(0)}  # no batch dim

    with pytest.raises(ConfigError, match=r"expected shape \(2, 3\)"):
        layer_grad_samples(Bad(), torch.ones(2, 3), torch.ones(2, 3))


# ------------------------------------------------------------ DPSGDStep: one machinery
class Custom(nn.Module):
    """No formula, no registered sampler: torch.func on this layer alone."""

    def __init__(self, d: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(d))
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.dropout(torch.tanh(x * self.w), self.dropout) + x


def _net(dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(7)
    return nn.Sequential(
        nn.Conv1d(2, 4, 3, groups=2, padding="same", padding_mode="reflect"),
        nn.Flatten(),
        nn.LayerNorm(48),
        Custom(48, dropout),
        nn.Linear(48, 3),
    ).double()


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_dpsgd_step_takes_the_layerwise_path_with_the_per_layer_fallback(dropout):
    """Models with layers beyond the original formula set (grouped reflect-padded conv,
    LayerNorm, a custom layer) go layer-wise in DPSGDStep; the noiseless update equals
    the clipped average of whole-model torch.func gradients. A layer drawing random
    numbers makes the per-layer torch.func fail: the step falls back to whole-model."""
    from contextlib import nullcontext

    from labeldp.train import HardLabels
    from labeldp.train.dpsgd import DPSGDStep
    from labeldp.train.per_example import clip_factors, gradient_norms, per_example_gradients

    model = _net(dropout)
    x, y = torch.randn(10, 2, 12, dtype=torch.float64), torch.randint(0, 3, (10,))
    step = DPSGDStep(0.5, 0.0, expected_batch_size=10.0, physical_batch_size=4)
    step(model, x, torch.arange(10), HardLabels(y), nullcontext)
    assert (id(model) in step._fallback) == (dropout > 0)
    if dropout:
        return
    grads, _, _ = per_example_gradients(model, x, y)
    factors = clip_factors(gradient_norms(grads), 0.5)
    for name, p in model.named_parameters():
        expected = torch.tensordot(factors, grads[name], dims=1) / 10
        torch.testing.assert_close(p.grad, expected, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("name", ["lstm-rows", "vit-patches"])
def test_dpsgd_step_runs_the_sequence_models_layer_wise(name):
    """The zoo's LSTM (a recurrent cell's Linear called at every time step) and patch
    transformer (attention from Linears, a position Embedding) go layer-wise in DPSGDStep,
    and the noiseless update equals the clipped average of whole-model torch.func
    gradients."""
    from contextlib import nullcontext

    from labeldp.models import build_model
    from labeldp.train import HardLabels
    from labeldp.train.dpsgd import DPSGDStep
    from labeldp.train.per_example import clip_factors, gradient_norms, per_example_gradients

    torch.manual_seed(3)
    model = build_model(name, num_classes=4, in_channels=1, image_size=14, norm="group")
    if name == "vit-patches":  # 14 = 2 patches of 7 per side
        assert model.tokens == 4
    model = model.double()
    x, y = torch.randn(9, 1, 14, 14, dtype=torch.float64), torch.randint(0, 4, (9,))
    step = DPSGDStep(0.3, 0.0, expected_batch_size=9.0, physical_batch_size=5)
    step(model, x, torch.arange(9), HardLabels(y), nullcontext)
    assert id(model) not in step._fallback
    grads, _, _ = per_example_gradients(model, x, y)
    factors = clip_factors(gradient_norms(grads), 0.3)
    assert (factors < 1).any()
    for pname, p in model.named_parameters():
        expected = torch.tensordot(factors, grads[pname], dims=1) / 9
        torch.testing.assert_close(p.grad, expected, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("chunk", [1, 50, 2500, 1 << 22])  # 2500: 2 conv examples per chunk
def test_norms_in_chunks_of_examples_equal_the_whole_batch(monkeypatch, chunk):
    """Per-example norms are computed in chunks of examples (bounded temporaries); any chunk
    size gives the norms of the materialized per-example gradients."""
    import labeldp.train.per_example as pe

    monkeypatch.setattr(pe, "NORM_CHUNK_ELEMENTS", chunk)
    torch.manual_seed(5)
    conv = nn.Conv2d(4, 6, 3, padding=1, groups=2).double()
    seq = nn.Linear(5, 3).double()
    for layer, a, g in [
        (conv, torch.randn(7, 4, 6, 5, dtype=torch.float64), torch.randn(7, 6, 6, 5).double()),
        # 2x2 outputs: T² = 16 ≤ p·d = 54, the ghost (Gram) norm
        (conv, torch.randn(7, 4, 2, 2, dtype=torch.float64), torch.randn(7, 6, 2, 2).double()),
        (seq, torch.randn(7, 9, 5, dtype=torch.float64), torch.randn(7, 9, 3).double()),
        (seq, torch.randn(7, 2, 5, dtype=torch.float64), torch.randn(7, 2, 3).double()),
    ]:
        grads = pe.layer_grad_samples(layer, a, g)
        expected = sum(v.reshape(7, -1).pow(2).sum(1) for v in grads.values())
        torch.testing.assert_close(pe.layer_sq_norms(layer, a, g), expected, rtol=1e-10, atol=0)


@pytest.mark.parametrize("chunk", [1, 2500, 1 << 22])  # 2500: 2 examples per chunk
def test_conv_grad_samples_in_chunks_of_examples_equal_micro_batching(monkeypatch, chunk):
    """A convolution's per-example gradients are built in chunks of examples (the unfolded
    input of an early convolution is far larger than the gradients); every chunk size
    gives the gradients of one example at a time through autograd."""
    import labeldp.train.per_example as pe

    monkeypatch.setattr(pe, "NORM_CHUNK_ELEMENTS", chunk)
    torch.manual_seed(6)
    conv = nn.Conv2d(4, 6, 3, padding=1, groups=2, dilation=1).double()
    a, g = torch.randn(7, 4, 6, 5, dtype=torch.float64), torch.randn(7, 6, 6, 5).double()
    got = pe.layer_grad_samples(conv, a, g)
    for i in range(7):
        conv.zero_grad()
        (conv(a[i : i + 1]) * g[i : i + 1]).sum().backward()
        torch.testing.assert_close(got["weight"][i], conv.weight.grad, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(got["bias"][i], conv.bias.grad, rtol=1e-10, atol=1e-12)
