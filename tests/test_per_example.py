"""Per-example gradients against Opacus (the oracle), and the layer-wise path against the
torch.func path: norms and clipped sums."""

from __future__ import annotations

import copy
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from labeldp.models import SmallCNN
from labeldp.train.per_example import (
    LayerwiseClipping,
    LayerwiseUnsupported,
    clip_factors,
    formula_supported,
    gradient_norms,
    layerwise_supported,
    per_example_gradients,
    unfold2d,
)

opacus = pytest.importorskip("opacus")


class Bag(nn.Module):
    """An embedding model: token ids (B, T) -> mean embedding -> linear."""

    def __init__(self, padding_idx: int | None = 0) -> None:
        super().__init__()
        self.embed = nn.Embedding(30, 6, padding_idx=padding_idx)
        self.out = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.embed(x).mean(1))


class OddConv(nn.Module):
    """Convolutions with bias, stride, dilation and padding, a GroupNorm on (B, C) and a
    linear layer over a sequence dimension."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2))
        self.c2 = nn.Conv2d(4, 6, 1, stride=2)
        self.seq = nn.Linear(6, 5)
        self.norm = nn.GroupNorm(1, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.c2(torch.tanh(self.c1(x))))  # (B, 6, H, W)
        h = self.seq(h.flatten(2).transpose(1, 2))  # (B, T, 5)
        return self.head(self.norm(h.mean(1)))


class Repeated(nn.Module):
    """One Linear and one GroupNorm each applied twice per example."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.norm = nn.GroupNorm(2, 4)
        self.b = nn.Linear(4, 2)

    def forward(self, x):
        h = torch.tanh(self.norm(self.a(x)))
        return self.b(torch.tanh(self.norm(self.a(h))))


class RowLSTM(nn.Module):
    """DPLSTM over (B, T, 3) sequences, the last hidden state to a linear head."""

    def __init__(self) -> None:
        super().__init__()
        from labeldp.dpsgd import DPLSTM

        self.lstm = DPLSTM(3, 5, batch_first=True)
        self.head = nn.Linear(5, 4)

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


def _cases():
    torch.manual_seed(0)
    cnn = SmallCNN(num_classes=10, in_channels=1, image_size=28, norm="group", width=4)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 5))
    return {
        "cnn": (cnn, torch.randn(6, 1, 28, 28), torch.randint(0, 10, (6,))),
        "mlp": (mlp, torch.randn(7, 3, 4), torch.randint(0, 5, (7,))),
        "embedding": (Bag(), torch.randint(0, 30, (8, 5)), torch.randint(0, 4, (8,))),
        # Opacus ignores padding_idx (its grad sample is non-zero on the padding row,
        # unlike torch's gradient), so the Opacus comparison uses no padding index.
        "embedding-no-padding": (
            Bag(None),
            torch.randint(0, 30, (8, 5)),
            torch.randint(0, 4, (8,)),
        ),
        "odd-conv": (OddConv(), torch.randn(5, 2, 12, 11), torch.randint(0, 3, (5,))),
        # layers called several times in one pass: the per-example gradient is the sum
        # over the calls (a Linear twice, a GroupNorm twice; a recurrent cell 6 times)
        "repeated": (Repeated(), torch.randn(6, 4), torch.randint(0, 2, (6,))),
        "dplstm": (RowLSTM(), torch.randn(5, 6, 3), torch.randint(0, 4, (5,))),
    }


CASES = ["cnn", "mlp", "embedding", "odd-conv", "repeated", "dplstm"]


def _case(name: str):
    model, x, y = _cases()[name]
    model = model.double()
    return model, (x.double() if x.is_floating_point() else x), y


@pytest.mark.parametrize("name", ["cnn", "mlp", "embedding-no-padding"])
def test_per_example_gradients_equal_opacus_grad_samples(name):
    model, x, y = _case(name)
    ours, _, _ = per_example_gradients(model, x, y)
    oracle = opacus.GradSampleModule(copy.deepcopy(model), loss_reduction="sum")
    F.cross_entropy(oracle(x), y, reduction="sum").backward()
    for param_name, p in oracle._module.named_parameters():
        reference = p.grad_sample
        error = (ours[param_name] - reference).abs().max() / reference.abs().max()
        assert error <= 1e-5, (param_name, error.item())


@pytest.mark.parametrize("name", CASES)
def test_per_example_gradients_equal_one_backward_per_example(name):
    model, x, y = _case(name)
    ours, _, _ = per_example_gradients(model, x, y)
    for i in range(len(y)):
        model.zero_grad()
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        for k, p in model.named_parameters():
            torch.testing.assert_close(ours[k][i], p.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", CASES)
def test_layerwise_norms_and_clipped_sums_equal_the_materialized_ones(name):
    model, x, y = _case(name)
    assert layerwise_supported(model)
    grads, losses, logits = per_example_gradients(model, x, y)
    norms = gradient_norms(grads)
    lc = LayerwiseClipping(model)
    losses2, logits2, _ = lc.forward_backward(x, lambda _: y, nullcontext)
    torch.testing.assert_close(lc.sq_norms().sqrt().double(), norms.double(), rtol=1e-9, atol=0)
    factors = clip_factors(norms, norms.median().item())
    assert (factors < 1).any() and (factors == 1).any()  # some clipped, some not
    sums = lc.clipped_sums(factors)
    assert set(sums) == set(grads)
    for k, g in grads.items():
        expected = torch.tensordot(factors.to(g.dtype), g, dims=1)
        torch.testing.assert_close(sums[k].double(), expected.double(), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(losses2.double(), losses.double())
    torch.testing.assert_close(logits2.double(), logits.double())


def test_clipped_per_example_norms_are_at_most_c():
    model, x, y = _case("cnn")
    grads, _, _ = per_example_gradients(model, x, y)
    norms = gradient_norms(grads)
    for c in (1e-3, norms.min().item(), norms.max().item() * 2):
        assert (clip_factors(norms, c) * norms <= c).all()


def test_unfold2d_equals_torch_unfold():
    x = torch.randn(2, 3, 13, 9)
    for kernel, dilation, padding, stride in [
        ((3, 3), (1, 1), (1, 1), (1, 1)),
        ((3, 5), (2, 1), (2, 0), (2, 3)),
        ((1, 1), (1, 1), (0, 0), (2, 2)),
    ]:
        torch.testing.assert_close(
            unfold2d(x, kernel, dilation, padding, stride),
            F.unfold(x, kernel, dilation, padding, stride),
            rtol=0,
            atol=0,
        )


class InPlace(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 2)

    def forward(self, x):
        return self.b(torch.relu_(self.a(x)))


class Unused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 2)

    def forward(self, x):  # b's weight used outside its forward: out of the hooks' sight
        return F.linear(torch.tanh(self.a(x)), self.b.weight)


@pytest.mark.parametrize("model", [Unused(), InPlace()])
def test_layerwise_refuses_forward_passes_it_cannot_follow(model):
    lc = LayerwiseClipping(model)
    with pytest.raises(LayerwiseUnsupported):
        lc.forward_backward(torch.randn(3, 4), lambda _: torch.tensor([0, 1, 0]), nullcontext)


def test_unsupported_layers_are_detected():
    """Formulas for exact layer types only; any other layer takes torch.func on itself
    (still layer-wise); shared parameters are refused."""
    assert layerwise_supported(nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3)))
    assert formula_supported(nn.LayerNorm(3)) and formula_supported(nn.Conv2d(4, 4, 3, groups=2))
    assert layerwise_supported(nn.Sequential(nn.Linear(3, 3), nn.ReLU()))

    class Standardized(nn.Linear):  # a subclass may compute something else
        pass

    assert not formula_supported(Standardized(3, 3))
    assert layerwise_supported(nn.Sequential(Standardized(3, 3)))  # torch.func on the layer
    tied = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    tied[1].weight = tied[0].weight
    assert not layerwise_supported(tied)
