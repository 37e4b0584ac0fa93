"""The DP-SGD step, Poisson sampling and the dp-sgd method: clipping and averaging equal
Opacus's optimizer, the noise has standard deviation σC (statistical test), batches are
Poisson, the budget holds, BatchNorm is refused."""

from __future__ import annotations

import copy
import json
from contextlib import nullcontext

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from torch import nn

from labeldp import cli
from labeldp.errors import ConfigError
from labeldp.methods import build_method
from labeldp.models import SmallCNN
from labeldp.privacy import Accountant, dpsgd_epsilon, event_from_dict
from labeldp.privacy.dpsgd_accounting import dpsgd_event
from labeldp.runner import Environment, RunConfig, train_run
from labeldp.train import HardLabels, TrainConfig
from labeldp.train.dpsgd import DPSGDStep
from labeldp.train.sampling import PoissonBatches

opacus = pytest.importorskip("opacus")


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 5)).double()


class Twice(nn.Module):
    """Uses one layer twice: the step must fall back to torch.func."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(12, 12)
        self.b = nn.Linear(12, 5)

    def forward(self, x):
        x = x.flatten(1)
        return self.b(torch.tanh(self.a(torch.tanh(self.a(x)))))


@pytest.mark.parametrize("make_model", [_mlp, lambda: Twice().double()])
@pytest.mark.parametrize("physical", [64, 5])
def test_noiseless_step_equals_opacus_clipped_average(make_model, physical):
    model = make_model()
    x = torch.randn(23, 3, 4, dtype=torch.float64)
    y = torch.randint(0, 5, (23,))
    expected_batch = 20.0
    oracle = opacus.GradSampleModule(copy.deepcopy(model))
    optimizer = opacus.optimizers.DPOptimizer(
        torch.optim.SGD(oracle.parameters(), lr=0.1),
        noise_multiplier=0.0,
        max_grad_norm=0.05,
        expected_batch_size=int(expected_batch),
    )
    F.cross_entropy(oracle(x), y).backward()
    optimizer.pre_step()  # clip, sum, (zero) noise, divide by the expected batch size
    step = DPSGDStep(0.05, 0.0, expected_batch, physical_batch_size=physical)
    step(model, x, torch.arange(23), HardLabels(y), nullcontext)
    for (name, p), (_, q) in zip(
        model.named_parameters(), oracle._module.named_parameters(), strict=True
    ):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-7, atol=1e-12, msg=name)


def test_noise_has_standard_deviation_sigma_c_over_the_expected_batch():
    torch.manual_seed(0)
    model = SmallCNN(num_classes=10, norm="group", width=8)
    sigma, c, batch = 1.3, 0.7, 10.0
    step = DPSGDStep(c, sigma, batch)
    empty = torch.zeros(0, dtype=torch.int64)
    out = step(model, torch.zeros(0, 1, 28, 28), empty, HardLabels(empty), nullcontext)
    assert out.logits.shape == (0, 10)
    z = torch.cat([p.grad.flatten() for p in model.parameters()]).double() * batch / (sigma * c)
    n = z.numel()
    assert n > 50_000
    # (n − 1) s² / 1 ~ χ²(n − 1) and the mean ~ N(0, 1/n), at the 1e-4 level both sides
    chi2 = (n - 1) * z.var().item()
    assert stats.chi2.ppf(1e-4, n - 1) < chi2 < stats.chi2.ppf(1 - 1e-4, n - 1)
    assert abs(z.mean().item()) * np.sqrt(n) < stats.norm.ppf(1 - 1e-4)
    assert stats.kstest(z.numpy(), "norm").pvalue > 1e-4
    # a wrong scale would fail: the same draw read as σ·C·1.02
    assert not (stats.chi2.ppf(1e-4, n - 1) < chi2 / 1.02**2 < stats.chi2.ppf(1 - 1e-4, n - 1))


def test_secure_noise_comes_from_the_os_not_the_seed():
    grads = []
    for _ in range(2):
        torch.manual_seed(0)
        model = nn.Linear(3, 2)
        step = DPSGDStep(1.0, 1.0, 4.0, secure_noise=True)
        empty = torch.zeros(0, dtype=torch.int64)
        step(model, torch.zeros(0, 3), empty, HardLabels(empty), nullcontext)
        grads.append(model.weight.grad.clone())
    assert not torch.equal(grads[0], grads[1])


def test_poisson_batches_have_binomial_sizes_and_include_each_example_at_rate_q():
    n, expected = 200, 10
    sampler = PoissonBatches(expected)
    assert sampler.sample_rate(n) == 0.05 and sampler.steps_per_epoch(n) == 20
    generator = torch.Generator().manual_seed(0)
    counts = torch.zeros(n)
    sizes = []
    for _ in range(100):
        for batch in sampler.batches(n, generator):
            counts[batch] += 1
            sizes.append(len(batch))
            assert len(torch.unique(batch)) == len(batch)
    sizes = np.array(sizes)
    assert len(sizes) == 2000
    observed = np.bincount(sizes, minlength=31)[:31]
    probs = stats.binom.pmf(np.arange(31), n, 0.05)
    probs[-1] += stats.binom.sf(30, n, 0.05)
    keep = probs * len(sizes) >= 5
    f_obs = np.append(observed[keep], observed[~keep].sum())
    f_exp = np.append(probs[keep], probs[~keep].sum()) * len(sizes)
    assert stats.chisquare(f_obs, f_exp).pvalue > 1e-4
    # every example is in a binomial(2000, q) number of batches
    assert stats.chisquare(counts.numpy()).pvalue > 1e-4
    assert abs(counts.mean().item() - 100) < 1


def test_poisson_sampling_refuses_a_batch_larger_than_the_data():
    with pytest.raises(ValueError, match="at most the number of training examples"):
        list(PoissonBatches(50).batches(10, torch.Generator()))


pytestmark = pytest.mark.fake_fashion(n_train=300, n_test=100)


def _run(data_dir, out, norm="group", epochs=2, batch_size=30, **options):
    config = RunConfig(
        dataset="fashion-mnist",
        train=TrainConfig(epochs=epochs, batch_size=batch_size, lr=0.5),
        method="dp-sgd",
        method_options=options,
        norm=norm,
        crop_padding=0,
    )
    env = Environment(data_dir=str(data_dir), download=False, progress=False)
    return train_run(config, out, env)


def test_dp_sgd_run_stays_within_its_budget_and_records_the_events(data_dir, tmp_path):
    metrics = _run(data_dir, tmp_path / "a", epsilon=8.0, delta=1e-5, accountant="rdp")
    entry = metrics.ledger["entries"][0]
    event = entry["details"]["event"]
    assert event["self_composed"] == 2 * 10 and event["poisson_sampled"] == 0.1
    sigma = event["gaussian_noise_multiplier"]
    assert metrics.epsilon == pytest.approx(dpsgd_epsilon(sigma, 0.1, 20, 1e-5, "rdp"))
    assert 0.99 * 8 <= metrics.epsilon <= 8 and metrics.delta == 1e-5
    assert entry["details"]["replace_one_bound"]["epsilon"] == pytest.approx(2 * metrics.epsilon)
    # the stored event is the one accounted, under add/remove one example
    assert metrics.ledger["relation"] == entry["relation"] == "add or remove one example"
    stored = event_from_dict(entry["event"])
    assert stored == dpsgd_event(sigma, 0.1, 20)
    accounted = Accountant(entry["relation"], "rdp").compose(stored).epsilon(1e-5)
    assert accounted == metrics.epsilon
    assert metrics.test_accuracy > 0.3  # the bars are learnable even with noise


def test_dp_sgd_refuses_batchnorm_and_points_to_groupnorm(data_dir, tmp_path):
    with pytest.raises(ConfigError, match="--norm group"):
        _run(data_dir, tmp_path / "b", norm="batch", epsilon=3.0)


def test_a_noise_multiplier_over_the_budget_is_refused(data_dir, tmp_path):
    with pytest.raises(ConfigError, match="above the budget epsilon = 1.0"):
        _run(data_dir, tmp_path / "c", epsilon=1.0, noise_multiplier=0.3, accountant="rdp")


@pytest.mark.parametrize(
    "options, fragment",
    [
        ({"epsilon": 1, "delta": 0}, "delta must be a number in (0, 1)"),
        ({"epsilon": 1, "max_grad_norm": -1}, "max_grad_norm must be"),
        ({"epsilon": 1, "accountant": "gdp"}, "accountant must be one of pld, rdp"),
        ({"epsilon": 1, "physical_batch_size": 0}, "physical_batch_size"),
    ],
)
def test_dp_sgd_options_are_validated(options, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        build_method("dp-sgd", options)


def test_cli_trains_dp_sgd(data_dir, tmp_path):
    out = tmp_path / "cli"
    argv = [
        "train", "--dataset", "fashion-mnist", "--method", "dp-sgd", "--epsilon", "4",
        "--delta", "1e-5", "--max-grad-norm", "2", "--norm", "group", "--accountant", "rdp",
        "--physical-batch-size", "7", "--epochs", "1", "--batch-size", "30",
        "--crop-padding", "0", "--data-dir", str(data_dir), "--out", str(out), "--quiet",
    ]  # fmt: skip
    assert cli.main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epsilon"] <= 4
    assert metrics["ledger"]["entries"][0]["details"]["max_grad_norm"] == 2.0


def test_an_interrupted_dp_sgd_run_resumes_bit_exactly(tmp_path):
    """Noise and Poisson coins come from the per-epoch seeded streams, so the resumed run
    equals the uninterrupted one (and does not redraw a finished epoch's noise)."""
    from labeldp.augment import Normalize
    from labeldp.train import Trainer

    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (120,), generator=g)
    images = torch.randint(0, 255, (120, 1, 6, 6), generator=g, dtype=torch.uint8)
    config = TrainConfig(epochs=3, batch_size=20, lr=0.5, seed=4)

    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Flatten(), nn.Linear(36, 8), nn.Tanh(), nn.Linear(8, 2))

    class Interrupting(DPSGDStep):
        def __call__(self, *args, **kwargs):
            if self.steps_taken == 6 * 2 + 3:
                raise KeyboardInterrupt
            return super().__call__(*args, **kwargs)

    def trainer(step, ckpt=None):
        return Trainer(
            model(), images, HardLabels(labels), config, normalize=Normalize((0.5,), (0.3,)),
            step=step, sampler=PoissonBatches(20), checkpoint_path=ckpt, progress=False,
        )  # fmt: skip

    straight = trainer(DPSGDStep(1.0, 1.0, 20)).fit()
    ckpt = tmp_path / "dp.ckpt"
    with pytest.raises(KeyboardInterrupt):
        trainer(Interrupting(1.0, 1.0, 20), ckpt).fit()
    resumed = trainer(DPSGDStep(1.0, 1.0, 20), ckpt).fit(resume=True)
    assert resumed.resumed_from_epoch == 2
    for a, b in zip(
        straight.eval_model.state_dict().values(),
        resumed.eval_model.state_dict().values(),
        strict=True,
    ):
        assert torch.equal(a, b)


def test_empty_poisson_batches_train_and_training_statistics_are_withheld():
    from labeldp.augment import Normalize
    from labeldp.train import Trainer

    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 2, (30,), generator=g)
    images = torch.randint(0, 255, (30, 1, 4, 4), generator=g, dtype=torch.uint8)
    sizes = []

    class Recording(DPSGDStep):
        def __call__(self, model, inputs, indices, targets, autocast):
            sizes.append(len(indices))
            return super().__call__(model, inputs, indices, targets, autocast)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    step = Recording(1.0, 0.5, 1.0)
    result = Trainer(
        model, images, HardLabels(labels), TrainConfig(epochs=2, batch_size=1, lr=0.1),
        normalize=Normalize((0.5,), (0.3,)), step=step, sampler=PoissonBatches(1),
        progress=False,
    ).fit()  # fmt: skip
    assert len(sizes) == step.steps_taken == 60  # every step taken, empty or not
    assert sizes.count(0) > 5  # P(empty) = (29/30)^30 ≈ 0.36 per step
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(h.train_loss is None and h.train_accuracy is None for h in result.history)


class BatchMean(nn.Module):
    """Mixes the examples of a batch (subtracts the batch mean): per-example clipping must
    still bound each example's influence (the step falls back to torch.func)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(12, 6)
        self.b = nn.Linear(6, 3)

    def forward(self, x):
        h = self.a(x.flatten(1))
        return self.b(torch.tanh(h - h.mean(0, keepdim=True)))


class BroadcastNorm(nn.Module):
    """A supported layer applied to a (1, ·) buffer, broadcast over the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("const", torch.ones(1, 4))
        self.norm = nn.GroupNorm(1, 4)
        self.a = nn.Linear(12, 4)
        self.b = nn.Linear(4, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x.flatten(1)) + self.norm(self.const * 3 + 1)))


class Functional(nn.Module):
    """Uses a layer's weight without calling the layer."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(12, 4)
        self.b = nn.Linear(4, 3)

    def forward(self, x):
        return self.b(torch.tanh(F.linear(x.flatten(1), self.a.weight, self.a.bias)))


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(12, 12)
        self.b = nn.Linear(12, 12)
        self.b.weight = self.a.weight
        self.c = nn.Linear(12, 3)

    def forward(self, x):
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x.flatten(1))))))


class MyLinear(nn.Linear):
    def forward(self, x):  # weight standardization: not what nn.Linear's formula assumes
        w = self.weight - self.weight.mean()
        return F.linear(x, w, self.bias)


class Subclassed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = MyLinear(12, 3)

    def forward(self, x):
        return self.a(x.flatten(1))


@pytest.mark.parametrize(
    "make_model", [_mlp, BatchMean, BroadcastNorm, Functional, Tied, Subclassed]
)
def test_removing_one_example_moves_the_clipped_sum_by_at_most_c(make_model):
    """The sensitivity the accountant assumes, measured: the noiseless sum of clipped
    gradients with and without one example differs by at most C in L2 norm, whatever the
    model does (including mixing examples or hiding parameters from the layer hooks)."""
    torch.manual_seed(0)
    model = make_model().double()
    x = torch.randn(16, 3, 4, dtype=torch.float64) * 3
    y = torch.randint(0, 3, (16,))
    c = 0.01  # far below every gradient norm: each example contributes exactly C

    def clipped_sum(keep):
        for p in model.parameters():
            p.grad = None
        step = DPSGDStep(c, 0.0, expected_batch_size=1.0, physical_batch_size=5)
        step(model, x[keep], keep, HardLabels(y), nullcontext)
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    everyone = torch.arange(16)
    full = clipped_sum(everyone)
    for j in (0, 7, 15):
        diff = torch.linalg.vector_norm(full - clipped_sum(everyone[everyone != j])).item()
        assert diff <= c * (1 + 1e-6), (j, diff / c)
