"""Mixup in the back-propagation step (labeldp.train.steps) and who refuses it, checked
against hand computations: the mixed inputs and targets, the gradients of a linear model,
the unmixed inputs that logit-dependent targets see, and the Beta(α, α) draws."""

from __future__ import annotations

import math
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from labeldp.augment import Normalize
from labeldp.errors import ConfigError
from labeldp.methods import build_method
from labeldp.methods.base import RunCheck
from labeldp.train import TrainConfig
from labeldp.train.loop import Trainer
from labeldp.train.steps import BackpropStep, GradientStep, mix, mixup_pairs
from labeldp.train.targets import HardLabels, TargetFn

B, D, K = 8, 5, 3


class Recording(nn.Module):
    """A linear model that records every input batch it is called on."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(123)
        self.linear = nn.Linear(D, K)
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach().clone())
        return self.linear(x)


class SoftFromLogits(TargetFn):
    """Soft targets softmax(logits / 2), recording the logits each call receives."""

    def __init__(self) -> None:
        self.received: list[torch.Tensor] = []

    def __call__(self, indices, logits):
        self.received.append(logits.clone())
        return torch.softmax(logits / 2, dim=1)


def _autocast():
    return nullcontext()


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    inputs = torch.randn(B, D, generator=g)
    labels = torch.randint(0, K, (20,), generator=g)
    indices = torch.randperm(20, generator=g)[:B]
    return inputs, labels, indices


def _expected_draws(seed: int, alpha: float, batch: int = B):
    """λ and π drawn independently of the library, in the order mixup_pairs draws them."""
    torch.manual_seed(seed)
    lam = float(torch.distributions.Beta(float(alpha), float(alpha)).sample())
    perm = torch.randperm(batch)
    return lam, perm


def _linear_grads(model: Recording, x: torch.Tensor, t: torch.Tensor):
    """Hand-computed gradient of the mean soft cross-entropy of a linear model: with
    p = softmax(Wx + b), ∂L/∂W = (p − t)ᵀ x / B and ∂L/∂b = mean(p − t)."""
    with torch.no_grad():
        p = torch.softmax(x @ model.linear.weight.T + model.linear.bias, dim=1)
        diff = (p - t) / x.shape[0]
        return diff.T @ x, diff.sum(dim=0)


def test_mixup_pairs_draws_beta_then_a_permutation_from_the_global_generator():
    torch.manual_seed(11)
    lam, perm = mixup_pairs(B, 0.7, torch.device("cpu"))
    want_lam, want_perm = _expected_draws(11, 0.7)
    assert lam == want_lam and 0 <= lam <= 1
    assert torch.equal(perm, want_perm)
    assert sorted(perm.tolist()) == list(range(B))
    x = torch.randn(B, D)
    manual = torch.stack([lam * x[i] + (1 - lam) * x[perm[i]] for i in range(B)])
    torch.testing.assert_close(mix(x, lam, perm), manual, rtol=0, atol=1e-6)
    for bad in (0, -1.0, float("nan")):
        with pytest.raises(ConfigError, match="alpha"):
            mixup_pairs(B, bad, torch.device("cpu"))


def test_the_mixed_step_trains_on_mixed_inputs_and_mixed_one_hot_targets():
    inputs, labels, indices = _batch()
    model = Recording()
    torch.manual_seed(5)
    out = BackpropStep(mixup_alpha=0.4)(model, inputs, indices, HardLabels(labels), _autocast)
    lam, perm = _expected_draws(5, 0.4)
    assert 0 < lam < 1 and not torch.equal(perm, torch.arange(B))  # a real mix with this seed
    # hard labels need no logits: the model is called once, on the mixed batch
    (seen,) = model.seen
    torch.testing.assert_close(seen, lam * inputs + (1 - lam) * inputs[perm], rtol=0, atol=1e-6)
    onehot = F.one_hot(labels[indices], K).double()
    want_targets = lam * onehot + (1 - lam) * onehot[perm]
    assert out.targets.dtype.is_floating_point and out.targets.shape == (B, K)
    torch.testing.assert_close(out.targets.double(), want_targets, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.targets.sum(dim=1), torch.ones(B), rtol=0, atol=1e-6)
    assert (out.targets >= 0).all()
    # the loss and gradients are those of the soft cross-entropy on the mixed batch
    t = want_targets.float()
    logits = seen @ model.linear.weight.T + model.linear.bias
    want_loss = -(t * torch.log_softmax(logits, dim=1)).sum(dim=1).mean()
    torch.testing.assert_close(out.loss, want_loss.detach(), rtol=1e-5, atol=1e-6)
    grad_w, grad_b = _linear_grads(model, seen, t)
    torch.testing.assert_close(model.linear.weight.grad, grad_w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.linear.bias.grad, grad_b, rtol=1e-5, atol=1e-6)


def test_alpha_zero_is_exactly_the_unmixed_step_and_draws_nothing():
    inputs, labels, indices = _batch(1)
    model = Recording()
    torch.manual_seed(3)
    state = torch.get_rng_state()
    out = BackpropStep(0.0)(model, inputs, indices, HardLabels(labels), _autocast)
    assert torch.equal(torch.get_rng_state(), state)  # no λ, no π drawn
    (seen,) = model.seen
    assert torch.equal(seen, inputs)
    assert torch.equal(out.targets, labels[indices])
    t = F.one_hot(labels[indices], K).float()
    grad_w, grad_b = _linear_grads(model, inputs, t)
    torch.testing.assert_close(model.linear.weight.grad, grad_w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.linear.bias.grad, grad_b, rtol=1e-5, atol=1e-6)
    want = F.cross_entropy(inputs @ model.linear.weight.T + model.linear.bias, labels[indices])
    torch.testing.assert_close(out.loss, want.detach())
    # the default step is the unmixed one
    assert BackpropStep().mixup_alpha == 0.0
    for bad in (-0.5, float("nan")):
        with pytest.raises(ConfigError, match="mixup_alpha"):
            BackpropStep(bad)


def test_logit_targets_are_computed_on_the_unmixed_inputs_then_mixed():
    inputs, _, indices = _batch(2)
    model = Recording()
    targets = SoftFromLogits()
    torch.manual_seed(9)
    out = BackpropStep(mixup_alpha=1.0)(model, inputs, indices, targets, _autocast)
    lam, perm = _expected_draws(9, 1.0)
    assert len(model.seen) == 2
    clean, mixed = model.seen
    assert torch.equal(clean, inputs)  # first pass: the unmixed batch
    torch.testing.assert_close(mixed, lam * inputs + (1 - lam) * inputs[perm], rtol=0, atol=1e-6)
    (received,) = targets.received
    with torch.no_grad():
        clean_logits = inputs @ model.linear.weight.T + model.linear.bias
    torch.testing.assert_close(received, clean_logits, rtol=1e-6, atol=1e-6)
    soft = torch.softmax(clean_logits / 2, dim=1)
    torch.testing.assert_close(out.targets, lam * soft + (1 - lam) * soft[perm])
    torch.testing.assert_close(out.targets.sum(dim=1), torch.ones(B))
    grad_w, grad_b = _linear_grads(model, mixed, out.targets)
    torch.testing.assert_close(model.linear.weight.grad, grad_w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.linear.bias.grad, grad_b, rtol=1e-5, atol=1e-6)


def test_lambda_follows_beta_alpha_alpha():
    """Beta(α, α) has mean 1/2 and variance 1/(4(2α+1)). With n = 3000 draws at α = 0.5
    (sd 0.354) the standard error of the mean is 0.0065: tolerance 0.03 (> 4.5 SE); the
    sample variance (1/8) is checked to ±0.015. Seeded, so deterministic."""
    torch.manual_seed(2024)
    n, alpha = 3000, 0.5
    lams = torch.tensor([mixup_pairs(2, alpha, torch.device("cpu"))[0] for _ in range(n)])
    assert ((lams >= 0) & (lams <= 1)).all()
    assert abs(lams.mean().item() - 0.5) < 0.03
    assert abs(lams.var().item() - 1 / (4 * (2 * alpha + 1))) < 0.015
    # a small α mixes little (λ near 0 or 1), a large one near 1/2
    torch.manual_seed(1)
    big = torch.tensor([mixup_pairs(2, 50.0, torch.device("cpu"))[0] for _ in range(300)])
    assert abs(big.mean().item() - 0.5) < 0.02 and big.std().item() < 0.1


class NoMixupStep(GradientStep):
    def __call__(self, model, inputs, indices, targets, autocast):  # pragma: no cover
        raise AssertionError("never called")


def _trainer(step, alpha):
    images = torch.zeros(10, 1, 4, 4, dtype=torch.uint8)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    return Trainer(
        model,
        images,
        HardLabels(torch.zeros(10, dtype=torch.int64)),
        TrainConfig(epochs=1, batch_size=5, mixup_alpha=alpha),
        normalize=Normalize([0.5], [0.5]),
        step=step,
        progress=False,
    )


def test_the_trainer_refuses_mixup_with_a_step_that_cannot_mix():
    with pytest.raises(ConfigError, match="mixup_alpha"):
        _trainer(NoMixupStep(), 0.5)
    assert isinstance(_trainer(NoMixupStep(), 0.0).step, NoMixupStep)  # no mixup: fine
    default = _trainer(None, 0.3).step
    assert isinstance(default, BackpropStep) and default.mixup_alpha == 0.3
    explicit = BackpropStep(0.3)
    assert _trainer(explicit, 0.3).step is explicit


def _check(alpha):
    return RunCheck(
        num_examples=100,
        num_classes=10,
        config=TrainConfig(epochs=1, batch_size=10, mixup_alpha=alpha),
        build_model=lambda: nn.Sequential(nn.Flatten(), nn.Linear(784, 10)),
    )


def test_dp_sgd_and_pate_fm_refuse_mixup():
    dpsgd = build_method("dp-sgd", {"epsilon": 1.0})
    with pytest.raises(ConfigError, match="mixup_alpha"):
        dpsgd.check(_check(0.2))
    pate = build_method(
        "pate-fm",
        {"epsilon": 1.0, "teachers": 5, "queries": 20, "threshold": 3.0, "sigma1": 2.0,
         "sigma2": 1.0},
    )  # fmt: skip
    with pytest.raises(ConfigError, match="mixup_alpha"):
        pate.check(_check(1e-3))
    pate.check(_check(0.0))  # without mixup the same run passes


@pytest.mark.parametrize("bad", [-0.1, -1, float("nan"), float("inf"), True, False, "1", None])
def test_train_config_rejects_bad_mixup_alpha(bad):
    with pytest.raises(ConfigError, match="mixup_alpha"):
        TrainConfig(epochs=1, mixup_alpha=bad)


@pytest.mark.parametrize("good", [0, 0.0, 0.2, 4])
def test_train_config_accepts_mixup_alpha(good):
    assert TrainConfig(epochs=1, mixup_alpha=good).mixup_alpha == good
    assert math.isfinite(TrainConfig(epochs=1, mixup_alpha=good).to_dict()["mixup_alpha"])
