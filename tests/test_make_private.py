"""labeldp.dpsgd: DP-SGD for the user's own model and loop (make_private).

The private update of the user's unchanged loop is compared with a micro-batch reference
(one example at a time: its gradient, clipped, summed, the same seeded noise, ÷ q·N); the
hooks' per-example gradients with micro-batching (hypothesis over small shapes) and with
Opacus' GradSampleModule; plus sensitivity, loss reductions, accounting, Poisson batches,
virtual batches, checkpoints, validation, argument checks and the README's example.
"""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from labeldp.dpsgd import (
    BudgetExhausted,
    DPOptimizer,
    GradSampleHooks,
    PoissonDataLoader,
    fix,
    make_private,
    validate,
    virtual_batches,
)
from labeldp.errors import ConfigError
from labeldp.mechanisms.randomness import standard_normal
from labeldp.privacy.dpsgd_accounting import dpsgd_epsilon

FAST = settings(max_examples=12, deadline=None, derandomize=True)
SIGMA, DELTA, LR = 0.8, 1e-5, 0.5


# ---------------------------------------------------------------------------- models
def small_cnn(inplace: bool = True) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.GroupNorm(2, 4),
        nn.ReLU(inplace=inplace),  # in place on the GroupNorm's output: hooks must cope
        nn.Conv2d(4, 4, 3, stride=2),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(4 * 3 * 3, 3),
    )


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 3))


class Scale(nn.Module):
    """A custom layer with a parameter and no formula: the torch.func fallback."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x * self.w) + x


class Bag(nn.Module):
    def __init__(self, vocab: int = 7, dim: int = 4, padding_idx: int | None = 0) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=padding_idx)
        self.out = nn.Linear(dim, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(self.emb(ids).mean(1))


def dataset(kind: str, n: int, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g) if kind == "cnn" else torch.randn(n, 6, generator=g)
    return TensorDataset(x, torch.randint(0, 3, (n,), generator=g))


def build(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return small_cnn() if kind == "cnn" else mlp()


def micro_batch_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss=None):
    """Each example's gradient, one example at a time: list of {name: tensor}."""
    loss = loss or (lambda out, t: F.cross_entropy(out, t, reduction="sum"))
    params = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
    grads = []
    for i in range(x.shape[0]):
        value = loss(model(x[i : i + 1]), y[i : i + 1])
        gs = torch.autograd.grad(value, [p for _, p in params], allow_unused=True)
        pairs = zip(params, gs, strict=True)
        grads.append({k: torch.zeros_like(p) if g is None else g for (k, p), g in pairs})
    return grads


def flat_norm(grad: dict[str, torch.Tensor]) -> float:
    return float(torch.sqrt(sum(g.double().pow(2).sum() for g in grad.values())))


def loop_step(model, optimizer, x, y, reduction="mean"):
    optimizer.zero_grad()
    loss = F.cross_entropy(model(x), y, reduction=reduction)
    loss.backward()
    optimizer.step()


# ---------------------------------------------------- the two-line API vs micro-batching
@pytest.mark.parametrize("kind", ["cnn", "mlp"])
def test_user_loop_update_equals_micro_batch_reference(kind):
    n, batch_size = 24, 6
    data = dataset(kind, n)
    model = build(kind)
    reference = build(kind)  # a twin without hooks
    # C at the median per-example norm: some examples clipped, some not
    norms = [flat_norm(g) for g in micro_batch_grads(reference, *data[:12])]
    clip = float(np.median(norms))
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    model, optimizer, loader = make_private(
        model,
        optimizer,
        DataLoader(data, batch_size=batch_size),
        max_grad_norm=clip,
        noise_multiplier=SIGMA,
        delta=DELTA,
        seed=11,
    )
    q = batch_size / n
    assert isinstance(optimizer, DPOptimizer) and optimizer.sample_rate == q
    clipped_and_not = [False, False]
    steps = 0
    for x, y in loader:
        reference.load_state_dict(model.state_dict())
        noise_gen = torch.Generator().manual_seed(0)
        noise_gen.set_state(optimizer.noise_generator.get_state())
        grads = micro_batch_grads(reference, x, y)
        expected = {}
        for k, p in reference.named_parameters():
            total = torch.zeros_like(p, dtype=torch.float64)
            for g in grads:
                norm = flat_norm(g)
                clipped_and_not[norm > clip] = True
                total += g[k].double() * min(1.0, clip / (norm + 1e-6))
            noise = standard_normal(tuple(p.shape), generator=noise_gen)
            update = (total + SIGMA * clip * noise) / (q * n)
            expected[k] = p.detach().double() - LR * update
        loop_step(model, optimizer, x, y)  # the user's loop, mean reduction
        steps += 1
        for k, p in model.named_parameters():
            torch.testing.assert_close(p.detach().double(), expected[k], atol=2e-5, rtol=1e-4)
    assert steps == len(loader) == -(-n // batch_size) == optimizer.steps
    assert clipped_and_not == [True, True]


# ------------------------------------------------ hooks' per-example gradients, per layer
def hooks_vs_micro_batch(model: nn.Module, x: torch.Tensor, y: torch.Tensor, reduction: str):
    twin = copy.deepcopy(model)  # before the hooks go on
    hooks = GradSampleHooks(model, reduction)
    try:
        F.cross_entropy(model(x), y, reduction=reduction).backward()
        ours = hooks.per_example_gradients()
    finally:
        hooks.remove()
    expected = micro_batch_grads(twin, x, y)
    names = [k for k, p in twin.named_parameters() if p.requires_grad]
    assert set(ours) == set(names)
    for k in names:
        want = torch.stack([g[k] for g in expected])
        torch.testing.assert_close(ours[k].to(want.dtype), want, atol=1e-5, rtol=1e-4)


@FAST
@given(
    b=st.integers(1, 4),
    t=st.integers(1, 3),
    d=st.integers(1, 5),
    bias=st.booleans(),
    reduction=st.sampled_from(["mean", "sum"]),
)
def test_linear_per_example(b, t, d, bias, reduction):
    torch.manual_seed(b * 100 + t * 10 + d)
    model = nn.Sequential(nn.Linear(d, 4, bias=bias), nn.Flatten(), nn.Linear(4 * t, 3))
    hooks_vs_micro_batch(model, torch.randn(b, t, d), torch.randint(0, 3, (b,)), reduction)


@FAST
@given(
    b=st.integers(1, 3),
    k=st.integers(1, 3),
    stride=st.integers(1, 2),
    padding=st.integers(0, 1),
    dilation=st.integers(1, 2),
    groups=st.sampled_from([1, 2]),
)
def test_conv2d_per_example(b, k, stride, padding, dilation, groups):
    """groups 1: the formula; groups 2: the torch.func fallback."""
    torch.manual_seed(b + 10 * k)
    conv = nn.Conv2d(2, 4, k, stride=stride, padding=padding, dilation=dilation, groups=groups)
    size = 7
    out = (size + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    model = nn.Sequential(conv, nn.Flatten(), nn.Linear(4 * out * out, 3))
    hooks_vs_micro_batch(model, torch.randn(b, 2, size, size), torch.randint(0, 3, (b,)), "sum")


@FAST
@given(b=st.integers(1, 4), groups=st.sampled_from([1, 2, 4]), spatial=st.booleans())
def test_groupnorm_per_example(b, groups, spatial):
    torch.manual_seed(b + groups)
    if not spatial and groups == 4:
        groups = 2  # one value per group: PyTorch refuses to normalize it in training
    norm = nn.GroupNorm(groups, 4)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    shape = (b, 4, 3, 3) if spatial else (b, 4)
    model = nn.Sequential(norm, nn.Flatten(), nn.Linear(36 if spatial else 4, 3))
    hooks_vs_micro_batch(model, torch.randn(shape), torch.randint(0, 3, (b,)), "mean")


@FAST
@given(b=st.integers(1, 4), t=st.integers(1, 5), padding=st.sampled_from([None, 0]))
def test_embedding_per_example(b, t, padding):
    torch.manual_seed(b * 7 + t)
    model = Bag(padding_idx=padding)
    ids = torch.randint(0, 7, (b, t))  # repeated ids within an example included
    hooks_vs_micro_batch(model, ids, torch.randint(0, 3, (b,)), "mean")


@pytest.mark.parametrize("layer", ["layernorm", "custom"])
def test_fallback_layer_per_example(layer):
    torch.manual_seed(3)
    middle = nn.LayerNorm(5) if layer == "layernorm" else Scale(5)
    if layer == "layernorm":
        with torch.no_grad():
            middle.weight.normal_()
            middle.bias.normal_()
    model = nn.Sequential(nn.Linear(4, 5), middle, nn.Linear(5, 3))
    hooks_vs_micro_batch(model, torch.randn(6, 4), torch.randint(0, 3, (6,)), "mean")


def test_hooks_match_opacus_grad_sample():
    opacus = pytest.importorskip("opacus")
    torch.manual_seed(5)
    for model, x in (
        (small_cnn(inplace=False), torch.randn(5, 1, 8, 8)),  # Opacus refuses in place
        # padding_idx=None: Opacus 1.6 gives the padding row a gradient, PyTorch (and we,
        # checked against micro-batching above) do not
        (Bag(padding_idx=None), torch.randint(0, 7, (5, 4))),
    ):
        y = torch.randint(0, 3, (5,))
        oracle = opacus.GradSampleModule(copy.deepcopy(model), loss_reduction="sum")
        F.cross_entropy(oracle(x), y, reduction="sum").backward()
        hooks = GradSampleHooks(model, "sum")
        F.cross_entropy(model(x), y, reduction="sum").backward()
        ours = hooks.per_example_gradients()
        hooks.remove()
        theirs = {k.removeprefix("_module."): p.grad_sample for k, p in oracle.named_parameters()}
        assert set(theirs) == set(ours)
        for k, value in theirs.items():
            torch.testing.assert_close(ours[k], value, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- sensitivity
@FAST
@given(drop=st.integers(0, 5), clip=st.sampled_from([0.05, 0.5, 5.0]))
def test_removing_one_example_moves_the_clipped_sum_by_at_most_c(drop, clip):
    torch.manual_seed(1)
    model = small_cnn()
    x, y = torch.randn(6, 1, 8, 8) * 3, torch.randint(0, 3, (6,))
    hooks = GradSampleHooks(model, "mean")
    try:
        F.cross_entropy(model(x), y).backward()
        norm = float(hooks.clipped_sums(clip)[1][drop])
        with_all = hooks_sums(hooks, model, x, y, clip)
        keep = [i for i in range(6) if i != drop]
        without = hooks_sums(hooks, model, x[keep], y[keep], clip)
    finally:
        hooks.remove()
    moved = math.sqrt(sum(float((with_all[p] - without[p]).pow(2).sum()) for p in with_all))
    assert moved <= clip * (1 + 1e-5)
    # and the bound is what the clipping makes it: min(C, ‖g‖) of the dropped example
    assert moved == pytest.approx(min(clip, norm), rel=1e-3)


def hooks_sums(hooks, model, x, y, clip):
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    return hooks.clipped_sums(clip)[0]


# -------------------------------------------------------------- loss reductions
def run_loop(kind, reduction, declared, steps=3, physical=None, seed=4):
    data = dataset(kind, 30)
    model = build(kind)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    model, optimizer, loader = make_private(
        model,
        optimizer,
        DataLoader(data, batch_size=6),
        max_grad_norm=0.3,
        noise_multiplier=SIGMA,
        delta=DELTA,
        seed=seed,
        loss_reduction=declared,
    )
    taken = 0
    if physical is None:
        batches = loader
        for x, y in batches:
            loop_step(model, optimizer, x, y, reduction)
            taken += 1
            if taken == steps:
                break
    else:
        with virtual_batches(loader, optimizer, max_physical_batch_size=physical) as chunks:
            for x, y in chunks:
                loop_step(model, optimizer, x, y, reduction)
                taken = optimizer.steps
                if taken == steps:
                    break
    return model, optimizer


def test_mean_and_sum_reductions_give_the_same_update():
    mean_model, _ = run_loop("mlp", "mean", "mean")
    sum_model, _ = run_loop("mlp", "sum", "sum")
    for a, b in zip(mean_model.parameters(), sum_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    other, _ = run_loop("mlp", "sum", "sum", seed=5)  # and the comparison can fail
    assert not torch.allclose(next(other.parameters()), next(sum_model.parameters()))


class OutsideUse(nn.Module):
    """Uses a layer's weight outside that layer's forward: the hooks cannot see it."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(6, 4)
        self.out = nn.Linear(4, 3, bias=False)

    def forward(self, x):
        h = torch.tanh(self.hidden(x))
        return self.out(h) + F.linear(h * h, self.out.weight)


def test_a_parameter_used_outside_its_layer_is_caught():
    model = OutsideUse()
    x, y = dataset("mlp", 6).tensors
    _, opt, _ = make_private(
        model, torch.optim.SGD(model.parameters(), lr=0.1), DataLoader(dataset("mlp", 6),
        batch_size=2), max_grad_norm=1.0, noise_multiplier=1.0, delta=DELTA,
    )
    loop_step(model, opt, x[:1], y[:1])  # one example: not checked yet
    assert opt.steps == 1
    with pytest.raises(ConfigError, match="do not add up"):
        loop_step(model, opt, x, y)


# ----------------------------------------------------------- accounting, virtual batches
def test_virtual_batches_give_the_same_steps_and_update():
    plain, plain_opt = run_loop("cnn", "mean", "mean", steps=4)
    chunked, chunked_opt = run_loop("cnn", "mean", "mean", steps=4, physical=2)
    assert plain_opt.steps == chunked_opt.steps == 4
    for a, b in zip(plain.parameters(), chunked.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert chunked_opt.epsilon() == pytest.approx(dpsgd_epsilon(SIGMA, 6 / 30, 4, DELTA))


def test_state_dict_resume_keeps_the_step_count_and_the_noise():
    kind, steps_before, steps_after = "mlp", 2, 2
    straight, straight_opt = run_loop(kind, "mean", "mean", steps=steps_before + steps_after)

    data = dataset(kind, 30)
    model = build(kind)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    model, opt, loader = make_private(
        model, opt, DataLoader(data, batch_size=6), max_grad_norm=0.3,
        noise_multiplier=SIGMA, delta=DELTA, seed=4,
    )
    it = iter(loader)
    for _ in range(steps_before):
        loop_step(model, opt, *next(it))
    saved = {
        "model": copy.deepcopy(model.state_dict()),
        "opt": copy.deepcopy(opt.state_dict()),
        "loader": loader.state_dict(),
    }
    assert saved["opt"]["dpsgd"]["steps"] == steps_before
    assert "state" in saved["opt"] and "param_groups" in saved["opt"]

    resumed = build(kind, seed=99)  # other initial weights: the checkpoint must win
    resumed.load_state_dict(saved["model"])
    opt2 = torch.optim.SGD(resumed.parameters(), lr=LR, momentum=0.9)
    resumed, opt2, loader2 = make_private(
        resumed, opt2, DataLoader(data, batch_size=6), max_grad_norm=0.3,
        noise_multiplier=SIGMA, delta=DELTA, seed=123,  # other seed: the state must win
    )
    opt2.load_state_dict(saved["opt"])
    loader2.load_state_dict(saved["loader"])
    assert opt2.steps == steps_before
    assert all(len(s) for s in opt2.state.values())  # momentum buffers restored
    # the loader's position within the epoch is not saved: a fresh iterator continues the
    # coins from the saved generator state, as the straight run's iterator did
    it2 = iter(loader2)
    for _ in range(steps_after):
        loop_step(resumed, opt2, *next(it2))
    assert opt2.steps == straight_opt.steps == steps_before + steps_after
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    assert opt2.epsilon(DELTA) == dpsgd_epsilon(SIGMA, 0.2, 4, DELTA)

    with pytest.raises(ConfigError, match="dpsgd"):
        opt2.load_state_dict(opt2.original_optimizer.state_dict())
    other = build(kind)
    _, opt3, _ = make_private(
        other, torch.optim.SGD(other.parameters(), lr=LR, momentum=0.9),
        DataLoader(data, batch_size=6), max_grad_norm=0.3, noise_multiplier=1.5,
        delta=DELTA,
    )
    with pytest.raises(ConfigError, match="noise_multiplier"):
        opt3.load_state_dict(saved["opt"])


def test_budget_stops_before_exceeding_max_epsilon():
    data = dataset("mlp", 20)
    model = build("mlp")
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    model, opt, loader = make_private(
        model, opt, DataLoader(data, batch_size=2), max_grad_norm=1.0,
        noise_multiplier=1.5, delta=DELTA, seed=0, max_epsilon=2.0, accountant="rdp",
    )
    with pytest.raises(BudgetExhausted, match="max_epsilon"):
        for _ in range(1000):
            for x, y in loader:
                loop_step(model, opt, x, y)
    assert 1 <= opt.steps == opt.max_steps
    assert opt.epsilon() <= 2.0 < dpsgd_epsilon(1.5, 0.1, opt.steps + 1, DELTA, "rdp")


# ------------------------------------------------------------------- Poisson loader
def test_poisson_batch_sizes_are_binomial():
    n, batch_size, draws = 1000, 50, 600
    loader = PoissonDataLoader(
        TensorDataset(torch.arange(n)), batch_size / n, generator=torch.Generator().manual_seed(0)
    )
    assert len(loader) == -(-n // batch_size)
    sizes = []
    members = torch.zeros(n)
    while len(sizes) < draws:
        for (batch,) in loader:
            sizes.append(len(batch))
            members[batch] += 1
            assert len(set(batch.tolist())) == len(batch)  # no repeats within a batch
    sizes = np.array(sizes[:draws])
    q = batch_size / n
    # goodness of fit to Binomial(N, q) on bins of about equal mass
    edges = stats.binom.ppf(np.linspace(0, 1, 9)[1:-1], n, q)
    observed = np.bincount(np.searchsorted(edges, sizes, side="left"), minlength=8)
    cdf = stats.binom.cdf(np.concatenate([edges, [n]]), n, q)
    expected = np.diff(np.concatenate([[0.0], cdf])) * draws
    assert stats.chisquare(observed, expected).pvalue > 1e-3
    assert sizes.var() == pytest.approx(n * q * (1 - q), rel=0.2)
    # a fixed-size sampler (always 50) is refused by the same test
    assert stats.chisquare(np.bincount(np.searchsorted(edges, np.full(draws, 50)),
                                       minlength=8), expected).pvalue < 1e-3


def test_empty_batches_take_a_noise_only_step():
    n = 20
    data = dataset("mlp", n)
    model = build("mlp")
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    model, opt, loader = make_private(
        model, opt, DataLoader(data, batch_size=1), max_grad_norm=1.0,
        noise_multiplier=SIGMA, delta=DELTA, seed=2,
    )
    empties = 0
    for x, y in loader:
        before = [p.detach().clone() for p in model.parameters()]
        gen = torch.Generator().manual_seed(0)
        gen.set_state(opt.noise_generator.get_state())
        loop_step(model, opt, x, y)
        if len(y) == 0:
            empties += 1
            assert x.shape == (0, 6) and x.dtype == data.tensors[0].dtype
            for b, p in zip(before, model.parameters(), strict=True):
                noise = standard_normal(tuple(p.shape), generator=gen).float()
                torch.testing.assert_close(p.detach(), b - LR * SIGMA * 1.0 * noise / 1.0)
    assert opt.steps == len(loader) == n
    assert empties >= 1  # P(empty) = 0.95^20 ≈ 0.36 per step, the seed gives some


# --------------------------------------------------------------- PyTorch contracts
def test_optimizer_contracts():
    data = dataset("mlp", 30)
    model = build("mlp")
    base = torch.optim.SGD(model.parameters(), lr=LR)
    model, opt, loader = make_private(
        model, base, DataLoader(data, batch_size=6), max_grad_norm=1.0,
        noise_multiplier=SIGMA, delta=DELTA, seed=0,
    )
    assert opt.param_groups is base.param_groups and opt.state is base.state
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x, y = next(iter(loader))

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert torch.is_tensor(loss) and opt.steps == 1
    scheduler.step()
    assert opt.param_groups[0]["lr"] == LR / 2
    with torch.no_grad():  # evaluation between steps records nothing
        model(x)
    assert opt.hooks.recorded_batch() == 0
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    # a layer used twice before a step is refused by name
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(ConfigError, match="ran 2 times"):
        opt.step()
    opt.detach()
    assert not opt.hooks._handles


# ------------------------------------------------------------- validation, bad input
class WithBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        return self.head(self.bn(self.conv(x)).flatten(1))


def test_validate_and_fix():
    model = WithBN()
    assert any(line.startswith("bn (BatchNorm2d)") for line in validate(model))
    with pytest.raises(ConfigError, match="bn .BatchNorm2d"):
        make_private(
            model, torch.optim.SGD(model.parameters(), lr=0.1),
            DataLoader(dataset("cnn", 10), batch_size=2), max_grad_norm=1.0,
            noise_multiplier=1.0, delta=DELTA,
        )
    fix(model)
    assert validate(model) == [] and isinstance(model.bn, nn.GroupNorm)
    lstm = nn.Sequential(nn.LSTM(3, 4))
    assert any("LSTM" in line for line in validate(lstm))
    shared = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    shared[1].weight = shared[0].weight
    assert any("shared" in line for line in validate(shared))


def _args(**change):
    model = build("mlp")
    kwargs = {
        "max_grad_norm": 1.0,
        "noise_multiplier": 1.0,
        "delta": DELTA,
    }
    kwargs.update(change)
    loader = kwargs.pop("loader", DataLoader(dataset("mlp", 10), batch_size=2))
    return (model, torch.optim.SGD(model.parameters(), lr=0.1), loader), kwargs


@pytest.mark.parametrize(
    "change, name",
    [
        ({"max_grad_norm": 0.0}, "max_grad_norm must be a finite number > 0"),
        ({"max_grad_norm": -1.0}, "max_grad_norm"),
        ({"noise_multiplier": -0.5}, "noise_multiplier must be a finite number ≥ 0"),
        ({"delta": 0.0}, r"delta must be a number in \(0, 1\)"),
        ({"delta": 1.0}, "delta"),
        ({"target_epsilon": 1.0}, "exactly one of noise_multiplier"),
        ({"noise_multiplier": None}, "exactly one of noise_multiplier"),
        ({"noise_multiplier": None, "target_epsilon": 1.0}, "target_epsilon needs epochs"),
        ({"epochs": 0}, "epochs must be an integer ≥ 1"),
        ({"accountant": "moments"}, "accountant must be one of"),
        ({"loss_reduction": "none"}, "loss_reduction must be one of"),
        ({"seed": 1, "secure_noise": True}, "seed must be None when secure_noise"),
        ({"max_epsilon": -1.0}, "max_epsilon must be a finite number > 0"),
        (
            {"loader": DataLoader(dataset("mlp", 10), batch_size=None)},
            "loader.batch_size must be an integer ≥ 1",
        ),
        (
            {"loader": DataLoader(dataset("mlp", 10), batch_size=11)},
            r"loader.batch_size must be in \[1, N = 10\]",
        ),
    ],
)
def test_bad_input_names_the_parameter(change, name):
    args, kwargs = _args(**change)
    with pytest.raises(ConfigError, match=name):
        make_private(*args, **kwargs)


def test_target_epsilon_is_reached_after_the_epochs():
    args, kwargs = _args(noise_multiplier=None, target_epsilon=2.0, epochs=3, accountant="rdp")
    model, opt, loader = make_private(*args, **kwargs)
    for _ in range(3):
        for x, y in loader:
            loop_step(model, opt, x, y)
    assert opt.steps == 3 * 5
    assert 2.0 * (1 - 2e-3) <= opt.epsilon() <= 2.0


# ------------------------------------------------------------------------- README
def test_readme_example_runs():
    text = Path(__file__).resolve().parents[1].joinpath("README.md").read_text()
    section = text.split("## DP-SGD on your own model and loop", 1)[1]
    block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    optimizer = namespace["optimizer"]
    assert isinstance(optimizer, DPOptimizer) and optimizer.steps > 0
    assert 0 < optimizer.epsilon(1e-5) < 10


@pytest.mark.parametrize("n, batch_size", [(1000, 30), (1000, 50), (999, 100), (7, 7), (10, 3)])
def test_an_epoch_is_the_same_number_of_steps_as_labeldp_trains(n, batch_size):
    from labeldp.dpsgd.loader import steps_per_epoch
    from labeldp.train.sampling import PoissonBatches

    expected = PoissonBatches(batch_size).steps_per_epoch(n)
    assert steps_per_epoch(batch_size / n) == expected == -(-n // batch_size)
    loader = PoissonDataLoader(TensorDataset(torch.arange(n)), batch_size / n)
    assert len(loader) == expected


# ------------------------------------------------ the two-line API vs labeldp's own trainer
def test_user_loop_equals_labeldp_train_dp_sgd_for_the_same_randomness():
    """``make_private`` on a plain user loop trains the same parameters as the training
    core behind ``labeldp train --method dp-sgd`` (:class:`DPSGDMethod.run` on a
    ``RunContext``, which is what the CLI calls: Trainer, PoissonBatches, DPSGDStep, the
    SGD of TrainConfig), when both are fed the same randomness.

    The two paths derive their generators from a seed differently: the core reseeds, at
    the start of every epoch e, the Poisson coins' generator with
    ``derive_seed(seed, EPOCH_BATCHES, e, key=noise_key)`` and the noise generator with
    ``derive_seed(ctx.noise_seed(DPSGD_NOISE), DPSGD_NOISE, e)``; make_private seeds one
    generator of each kind once. So before each epoch of the user's loop the test reseeds
    make_private's two generators through their public attributes
    (``loader.poisson_sampler.generator`` and ``optimizer.noise_generator``) with the core's
    seeds of that epoch. Same randomness in, same parameters out: the Poisson batches
    (torch.rand(N, float64) < q per step), the per-example clipping (core: layer-wise
    clipping from one backward; make_private: hooks on the user's backward), the noise
    (σ·C per coordinate, drawn parameter by parameter in the same order), the division by
    q·N and the SGD step (momentum, Nesterov, weight decay, constant learning rate) are one
    computation. The step counts agree with what each side's accountant composed, and so
    does ε (the core's count is the ledger's, which DPSGDMethod.run checks against the
    steps its DPSGDStep took).

    The core's DPSGDStep is built inside DPSGDMethod.run, so its generators are not
    reachable; their seeds are, through public functions (``ctx.noise_seed`` and
    ``labeldp.seeding.derive_seed``), and reseeding make_private's generators with
    ``manual_seed`` gives the very generators the core builds (torch.Generator().manual_seed).

    The only departure from the CLI: the model and its inputs are float64 (``normalize``
    is the run's Normalize followed by ``.double()``), so that the comparison can be
    tight — the two paths sum per-example terms in different orders.
    """
    import dataclasses

    from labeldp.augment import Normalize
    from labeldp.data import DeviceDataset
    from labeldp.data.sources import DATASETS
    from labeldp.methods.base import RunContext
    from labeldp.methods.dpsgd import DPSGDMethod
    from labeldp.seeding import Stream, config_key, derive_seed
    from labeldp.train import TrainConfig

    # C = 2 is about the median per-example gradient norm at initialisation (0.9 to 9):
    # both branches of the clip factor min(1, C / ‖g‖) are taken.
    n, batch, epochs, seed, clip, sigma, lr = 40, 8, 2, 7, 2.0, 1.0, 0.3
    info = dataclasses.replace(DATASETS["fashion-mnist"], num_classes=3, image_size=4)
    g = torch.Generator().manual_seed(11)
    images = torch.randint(0, 256, (n, 1, 4, 4), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 3, (n,), generator=g)
    test = DeviceDataset(images[:10].clone(), labels[:10].clone(), info)
    pixels = Normalize((0.4,), (0.3,))

    def normalize(uint8: torch.Tensor) -> torch.Tensor:
        return pixels(uint8).double()

    torch.manual_seed(3)
    initial = nn.Sequential(
        nn.Flatten(), nn.Linear(16, 6), nn.GroupNorm(2, 6), nn.Tanh(), nn.Linear(6, 3)
    ).double()
    config = TrainConfig(
        epochs=epochs, batch_size=batch, lr=lr, momentum=0.9, nesterov=True,
        weight_decay=5e-4, schedule="constant", seed=seed, precision="fp32",
    )  # fmt: skip
    key = config_key({"method": "dp-sgd", "test": "make_private"})

    # --- the training core, as `labeldp train --method dp-sgd` runs it
    method = DPSGDMethod(epsilon=20.0, noise_multiplier=sigma, max_grad_norm=clip, accountant="rdp")
    ctx = RunContext(
        train=DeviceDataset(images, labels, info), test=test,
        build_model=lambda: copy.deepcopy(initial), config=config, normalize=normalize,
        augment=None, progress=False, noise_key=key,
    )  # fmt: skip
    result = method.run(ctx)
    assert not result.fit.diverged and len(result.fit.history) == epochs
    core = dict(result.fit.eval_model.named_parameters())
    (entry,) = result.ledger.entries
    core_steps = entry.details["event"]["self_composed"]

    # --- the two-line API on the user's own loop, fed the core's randomness per epoch
    model = copy.deepcopy(initial)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4
    )
    data = TensorDataset(normalize(images), labels)
    model, optimizer, loader = make_private(
        model, optimizer, DataLoader(data, batch_size=batch), max_grad_norm=clip,
        noise_multiplier=sigma, delta=method.delta, accountant="rdp", seed=seed,
    )  # fmt: skip
    noise_seed = ctx.noise_seed(Stream.DPSGD_NOISE)  # the seed DPSGDMethod gives its step
    for epoch in range(epochs):
        batches = derive_seed(seed, Stream.EPOCH_BATCHES, epoch, key=key)
        loader.poisson_sampler.generator.manual_seed(batches)
        optimizer.noise_generator.manual_seed(derive_seed(noise_seed, Stream.DPSGD_NOISE, epoch))
        for x, y in loader:  # the user's loop, unchanged
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()

    assert optimizer.steps == core_steps == epochs * math.ceil(n / batch)
    assert optimizer.epsilon() == pytest.approx(entry.epsilon, rel=1e-12)
    user = dict(model.named_parameters())
    assert user.keys() == core.keys()
    start = dict(initial.named_parameters())
    moved = 0.0
    for name, p in user.items():
        assert p.dtype == core[name].dtype == torch.float64
        torch.testing.assert_close(p, core[name], rtol=1e-12, atol=1e-13, msg=name)
        moved = max(moved, float((p - start[name]).detach().abs().max()))
    assert moved > 1e-3  # the parameters did move: the comparison is not of two copies


def test_hooks_compact_small_layers_during_backward_and_match_micro_batching():
    """A layer with fewer parameters per example than its input + output gradient (a
    GroupNorm on a large activation) is turned into per-example gradients as soon as its
    output gradient arrives, releasing (a, g); a large Linear keeps (a, g) for the ghost
    norms. The per-example gradients equal one backward per example either way; a second
    backward through the same forward is refused by name."""
    from labeldp.dpsgd import GradSampleHooks

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.Flatten(), nn.Linear(4 * 36, 3)
    ).double()
    x, y = torch.randn(5, 1, 6, 6, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])
    hooks = GradSampleHooks(model, loss_reduction="sum")
    F.cross_entropy(model(x), y, reduction="sum").backward()
    calls = {layer.name: layer.calls[0] for layer in hooks.layers}
    assert calls["1"].samples is not None and calls["1"].args is None  # GroupNorm: 8 < 288
    assert calls["3"].samples is None and calls["3"].args is not None  # Linear: 435 > 147
    ours = hooks.per_example_gradients()
    hooks.remove()
    for i in range(5):
        model.zero_grad()
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1], reduction="sum").backward()
        for name, p in model.named_parameters():
            torch.testing.assert_close(ours[name][i], p.grad, rtol=1e-10, atol=1e-12)

    hooks = GradSampleHooks(model, loss_reduction="sum")
    loss = F.cross_entropy(model(x), y, reduction="sum")
    loss.backward(retain_graph=True)
    with pytest.raises(ConfigError, match="second backward pass reached layer 3"):
        loss.backward()
    hooks.remove()


class _TwoScales(nn.Module):
    """One Conv2d applied to the image (6x6: compacted, its per-example gradient is smaller
    than its input + output gradient) and to a pooled 1x1 copy (kept raw)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        big = self.conv(x).mean((2, 3))
        small = self.conv(F.adaptive_avg_pool2d(x, 1)).flatten(1)
        return self.head(torch.tanh(big + small))


def test_a_layer_with_compacted_and_raw_calls_clips_the_sum_of_its_calls():
    """A layer called twice, one call compacted and one not: its per-example gradient, norm
    and clipped sum are those of the sum over both calls (micro-batching reference)."""
    from labeldp.dpsgd import GradSampleHooks

    torch.manual_seed(2)
    model = _TwoScales().double()
    plain = copy.deepcopy(model)  # the micro-batching reference, without hooks
    x, y = torch.randn(6, 1, 6, 6, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2])
    hooks = GradSampleHooks(model, loss_reduction="mean")
    F.cross_entropy(model(x), y).backward()
    conv = next(layer for layer in hooks.layers if layer.name == "conv")
    assert [c.samples is not None for c in conv.calls] == [True, False]
    ours = hooks.per_example_gradients()
    reference = {}
    for i in range(6):
        plain.zero_grad()
        F.cross_entropy(plain(x[i : i + 1]), y[i : i + 1]).backward()
        for name, p in plain.named_parameters():
            reference.setdefault(name, []).append(p.grad.clone())
    reference = {k: torch.stack(v) for k, v in reference.items()}
    norms = torch.cat([v.reshape(6, -1) for v in reference.values()], 1).pow(2).sum(1).sqrt()
    c = float(norms.median())
    sums, got_norms, batch = hooks.clipped_sums(c)
    assert batch == 6
    torch.testing.assert_close(got_norms.double(), norms, rtol=1e-10, atol=0)
    factors = torch.clamp(c / (norms + 1e-6), max=1.0)
    for name, p in model.named_parameters():
        torch.testing.assert_close(ours[name], reference[name], rtol=1e-10, atol=1e-12)
        expected = torch.tensordot(factors, reference[name], dims=1)
        torch.testing.assert_close(sums[p].double(), expected, rtol=1e-10, atol=1e-12)
    hooks.remove()
