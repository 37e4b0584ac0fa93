"""LP-MST / LP-2ST: the prior guard (its estimator, its choice, the calibration slice),
per-stage mixup, and what a run draws and records."""

from __future__ import annotations

import math

import pytest
import torch
from fakes import count_calls as _count_calls
from fakes import tiny_run as _run
from scipy import stats

from labeldp.data import random_partition
from labeldp.errors import ConfigError
from labeldp.mechanisms import RandomizedResponse, RRWithPrior
from labeldp.methods import build_method, lp_mst
from labeldp.methods.base import RunCheck, RunContext
from labeldp.methods.lp_mst import (
    LP2ST,
    LPMST,
    choose_prior,
    guard_temperatures,
    paper_setting,
)
from labeldp.seeding import Stream, derive_seed
from labeldp.train import TrainConfig


def _spy_fits(monkeypatch):
    """Records (name, subset, config) of every RunContext.fit call."""
    fits: list[tuple[str, torch.Tensor, TrainConfig]] = []
    original = RunContext.fit

    def spy(self, targets, **kwargs):
        fits.append((kwargs["name"], kwargs["subset"].cpu(), kwargs.get("config") or self.config))
        return original(self, targets, **kwargs)

    monkeypatch.setattr(RunContext, "fit", spy)
    return fits


def _random_priors(n, num_classes, generator):
    """Priors of every sharpness, so that the top-k* sets have many sizes."""
    scale = torch.logspace(-1, 1.3, n, dtype=torch.float64)[:, None]
    logits = torch.randn(n, num_classes, generator=generator, dtype=torch.float64) * scale
    return torch.softmax(logits, dim=1)


def _release_probability(mechanism, labels, prior):
    """The exact Pr[RRWithPrior(y, prior) = y], row by row."""
    return mechanism.output_probabilities(labels, prior)[torch.arange(len(labels)), labels]


# --- the estimator -------------------------------------------------------------------------


@pytest.mark.parametrize("epsilon", [0.3, 1.0, 4.0, 30.0])
@pytest.mark.parametrize("num_classes", [2, 10])
def test_release_estimate_is_exactly_unbiased_over_the_rr_outputs(epsilon, num_classes):
    # E[ê | y] = Σ_c Pr[RR(y) = c] · ê(c), summed over every RR output c exactly.
    generator = torch.Generator().manual_seed(3)
    n = 60
    labels = torch.randint(0, num_classes, (n,), generator=generator)
    prior = _random_priors(n, num_classes, generator)
    mechanism = RRWithPrior(epsilon)
    rr = RandomizedResponse(epsilon, num_classes)
    every = torch.stack(
        [mechanism.release_estimates(torch.full((n,), c), prior) for c in range(num_classes)],
        dim=1,
    )
    expected = (rr.output_probabilities(labels) * every).sum(dim=1)
    truth = _release_probability(mechanism, labels, prior)
    torch.testing.assert_close(expected, truth, rtol=0, atol=1e-9)
    bound = (math.exp(min(epsilon, 700)) + num_classes - 1) / math.expm1(min(epsilon, 700))
    assert every.abs().max() <= bound * (1 + 1e-12)
    # Both inside and outside the top sets were exercised.
    inside = mechanism.in_top_set(labels, prior)
    assert inside.any() and not inside.all()


def _sampling_check(epsilon, estimator, num_classes=10, n=40, reps=4000, seed=11):
    """Fixed true labels and fixed top sets; RR applied ``reps`` times to each label.

    Per example, the mean of its ``reps`` estimates minus the exact release probability,
    over the exact standard error of the unbiased estimator, is ≈ N(0, 1) (CLT), so the
    sum of squares over the examples is ≈ χ²(n'). Returns that statistic, its 1 − 1e-6
    quantile (the rejection threshold: a false alarm once in a million), the overall
    error of the mean and its standard error, the estimates and the exact values."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (n,), generator=generator)
    prior = _random_priors(n, num_classes, generator)
    mechanism = RRWithPrior(epsilon)
    rr = RandomizedResponse(epsilon, num_classes)
    noisy = rr.privatize(labels.repeat(reps), generator)
    estimates = estimator(mechanism, noisy, prior.repeat(reps, 1)).reshape(reps, n)
    truth = _release_probability(mechanism, labels, prior)
    # Exact variance: ê = a·1{ỹ∈Y} + b, 1{ỹ∈Y} ~ Bernoulli(π), π = k·q + (p − q)·1{y∈Y}.
    p = rr.keep_probability
    q = (1 - p) / (num_classes - 1)
    members, k = mechanism.top_sets(prior)
    keep = 1 / (1 + (k.double() - 1) * math.exp(-epsilon))
    inside = members[torch.arange(n), labels].double()
    pi = k.double() * q + (p - q) * inside
    variance = (keep / (p - q)) ** 2 * pi * (1 - pi)
    random = variance > 0  # k = K: the estimate is the constant p
    assert random.sum() >= n // 2 and inside[random].bool().any() and not inside.bool().all()
    z = (estimates.mean(0) - truth)[random] / (variance[random] / reps).sqrt()
    statistic = float((z**2).sum())
    threshold = float(stats.chi2.ppf(1 - 1e-6, int(random.sum())))
    overall = float(estimates.mean() - truth.mean())
    overall_se = math.sqrt(float(variance.sum()) / reps) / n
    return statistic, threshold, overall, overall_se, estimates[:, ~random], truth[~random]


@pytest.mark.parametrize("epsilon", [0.5, 2.0])
def test_release_estimate_is_unbiased_under_sampling(epsilon):
    statistic, threshold, overall, overall_se, fixed, exact = _sampling_check(
        epsilon, lambda mechanism, noisy, prior: mechanism.release_estimates(noisy, prior)
    )
    assert statistic < threshold  # χ² test at level 1e-6
    assert abs(overall) < 5 * overall_se  # the mean over all examples, within 5 s.e.
    torch.testing.assert_close(fixed, exact.expand_as(fixed), rtol=0, atol=1e-12)


def test_the_sampling_check_rejects_the_uncorrected_estimate():
    # The check has power: 1{ỹ ∈ Y}·e^ε/(e^ε + k − 1), without the correction for RR's
    # noise, is rejected many times over.
    def naive(mechanism, noisy, prior):
        members, k = mechanism.top_sets(prior)
        inside = members[torch.arange(len(noisy)), noisy].double()
        return inside / (1 + (k.double() - 1) * math.exp(-mechanism.epsilon))

    statistic, threshold, *_ = _sampling_check(2.0, naive)
    assert statistic > 10 * threshold


@pytest.mark.parametrize("epsilon", [1e-6, 0.01, 1.0, 10.0, 50.0])
@pytest.mark.parametrize("num_classes", [2, 10, 100])
def test_rr_with_the_uniform_prior_is_exactly_rr(epsilon, num_classes):
    n = 2000
    uniform = torch.full((n, num_classes), 1.0 / num_classes, dtype=torch.float64)
    mechanism = RRWithPrior(epsilon)
    members, k = mechanism.top_sets(uniform)
    assert bool((k == num_classes).all()) and bool(members.all())
    labels = torch.randint(0, num_classes, (n,), generator=torch.Generator().manual_seed(0))
    rr = RandomizedResponse(epsilon, num_classes)
    torch.testing.assert_close(
        mechanism.output_probabilities(labels, uniform), rr.output_probabilities(labels)
    )
    same = mechanism.privatize(labels, uniform, torch.Generator().manual_seed(5))
    assert torch.equal(same, rr.privatize(labels, torch.Generator().manual_seed(5)))
    # The uniform prior's estimate is RR's keep probability, with no noise at all.
    noisy = rr.privatize(labels, torch.Generator().manual_seed(6))
    torch.testing.assert_close(
        mechanism.release_estimates(noisy, uniform),
        torch.full((n,), rr.keep_probability, dtype=torch.float64),
        rtol=1e-9,
        atol=0,
    )


# --- the choice ----------------------------------------------------------------------------


def _slice(epsilon, m=2000, num_classes=10, seed=0):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (m,), generator=generator)
    noisy = RandomizedResponse(epsilon, num_classes).privatize(labels, generator)
    return labels, noisy, generator


@pytest.mark.parametrize("epsilon", [1.0, 2.0, 8.0])
def test_a_collapsed_model_makes_the_guard_choose_the_uniform_prior(epsilon):
    labels, noisy, _ = _slice(epsilon)
    logits = torch.zeros(len(labels), 10)
    logits[:, 3] = 8.0  # predicts class 3 whatever the input
    temperature, record = choose_prior(logits, noisy, epsilon, guard_temperatures(0.5))
    assert temperature is None
    assert record["choice"] == {"prior": "uniform", "temperature": None}
    assert [c["temperature"] for c in record["candidates"]] == [0.5, 0.25, 1.0, 2.0, None]
    uniform = record["candidates"][-1]
    assert uniform["estimate"] == pytest.approx(RandomizedResponse(epsilon, 10).keep_probability)
    assert uniform["std_error"] == pytest.approx(0.0, abs=1e-12)
    assert record["calibration_examples"] == len(labels)
    # The collapsed prior is worse (its true release probability is ≈ 1/10 where k* = 1)
    # or, where k* = K, the same as RR; the estimates say so, ties exactly.
    model = record["candidates"][:-1]
    assert all(c["estimate"] <= uniform["estimate"] for c in model)
    assert any(c["estimate"] < uniform["estimate"] - 0.1 for c in model)
    for c in model:
        if c["mean_set_size"] == 10:
            assert c["estimate"] == uniform["estimate"]


@pytest.mark.parametrize("epsilon", [1.0, 2.0, 8.0])
def test_a_good_model_makes_the_guard_choose_a_model_prior(epsilon):
    labels, noisy, generator = _slice(epsilon)
    logits = 6.0 * torch.nn.functional.one_hot(labels, 10).float()
    logits += torch.randn(logits.shape, generator=generator)
    temperature, record = choose_prior(logits, noisy, epsilon, guard_temperatures(0.6))
    assert temperature is not None and temperature in guard_temperatures(0.6)
    assert record["choice"] == {"prior": "model", "temperature": temperature}
    best = max(record["candidates"], key=lambda c: c["estimate"])
    assert best["temperature"] == temperature
    assert best["estimate"] > record["candidates"][-1]["estimate"]


def test_guard_temperatures_start_with_the_configured_one_without_repeats():
    assert guard_temperatures(0.6) == [0.6, 0.25, 0.5, 1.0, 2.0]
    assert guard_temperatures(0.5) == [0.5, 0.25, 1.0, 2.0]


# --- options -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, says",
    [([1.0], "2 finite numbers ≥ 0"), ([1.0, 2.0, 3.0], "2 finite numbers ≥ 0")]
    + [(v, "a list of numbers ≥ 0") for v in ([1.0, -0.5], [float("nan"), 1.0], [True, 1.0],
                                              "8,4", 4.0)],
)  # fmt: skip
def test_stage_mixup_is_validated(value, says):
    with pytest.raises(ConfigError) as info:
        LPMST(1.0, stages=2, stage_mixup=value)
    message = str(info.value)
    assert f"stage_mixup must be {says}" in message and "None" in message


@pytest.mark.parametrize("value", [-0.01, 0.5, 0.9, float("nan"), True, "0.1", None])
def test_calibration_share_is_validated(value):
    with pytest.raises(ConfigError) as info:
        LP2ST(1.0, calibration_share=value)
    assert "calibration_share must be a number in [0, 0.5)" in str(info.value)


def test_new_options_round_trip_and_default():
    method = LPMST(4.0, stages=3)
    assert method.calibration_share == 0.05 and method.stage_mixup is None
    again = build_method("lp-mst", method.options())
    assert again.options() == method.options()
    paper = build_method(
        "lp-2st", {"epsilon": 1.0, "stage_mixup": (16, 8), "calibration_share": 0.0}
    )
    assert paper.options()["stage_mixup"] == [16.0, 8.0]
    assert paper.options()["calibration_share"] == 0.0
    options = {k: v for k, v in paper.options().items() if k != "stages"}
    assert build_method("lp-2st", options).options() == paper.options()


def test_calibration_slice_size_and_choice_ignore_labels():
    method = LP2ST(1.0, calibration_share=0.05)
    assert method.calibration_size(280) == 14 and method.calibration_size(5) == 1
    assert LP2ST(1.0, calibration_share=0.0).calibration_size(280) == 0
    a, b = method.calibration_positions(0, 280), method.calibration_positions(0, 280)
    assert torch.equal(a, b) and len(a) == 14 and len(set(a.tolist())) == 14
    assert not torch.equal(a, method.calibration_positions(1, 280))


# --- runs ----------------------------------------------------------------------------------


def test_lp_2st_randomizes_every_label_exactly_once_in_parallel(data_dir, tmp_path, monkeypatch):
    # (Moved from test_methods.py; stage 1 now trains without the calibration slice.)
    rr_calls = _count_calls(monkeypatch, RandomizedResponse)
    prior_calls = _count_calls(monkeypatch, RRWithPrior)
    metrics = _run(data_dir, tmp_path / "lp", "lp-2st", epsilon=2.0)
    assert len(rr_calls) == 1 and len(prior_calls) == 1
    entries = metrics.ledger["entries"]
    assert [e["mechanism"] for e in entries] == ["randomized-response", "rr-with-prior"]
    assert sum(e["examples"] for e in entries) == 400
    assert {e["composition"] for e in entries} == {"parallel"}
    assert metrics.epsilon == 2.0  # parallel composition: max, not sum
    share = paper_setting(2.0)[0]
    assert entries[0]["examples"] == round(share * 400)
    assert metrics.method_options["prior_temperature"] == 0.5
    stage1 = torch.load(tmp_path / "lp" / "stage1.noisy.pt")
    stage2 = torch.load(tmp_path / "lp" / "stage2.noisy.pt")
    assert len(stage1) + len(stage2) == 400
    histories = metrics.method_details["stage_histories"]
    assert len(histories) == 2
    assert metrics.train_seconds == pytest.approx(
        sum(h["seconds"] for hs in histories for h in hs)
    )
    sizes = metrics.method_details["stage_training_sizes"]
    held_out = metrics.method_details["calibration_examples"]
    assert held_out == round(0.05 * len(stage1))
    assert sizes[0] == len(stage1) - held_out and len(stage2) <= sizes[1] <= 400


def test_lp_2st_guard_slice_and_stage_mixup_end_to_end(data_dir, tmp_path, monkeypatch):
    fits = _spy_fits(monkeypatch)
    guarded = []
    original = lp_mst.choose_prior

    def spy(logits, rr_labels, epsilon, temperatures):
        guarded.append(rr_labels.cpu().clone())
        return original(logits, rr_labels, epsilon, temperatures)

    monkeypatch.setattr(lp_mst, "choose_prior", spy)
    out = tmp_path / "guard"
    options = {"epsilon": 2.0, "drop_outside_topk": False, "stage_mixup": [0.0, 2.0]}
    metrics = _run(data_dir, out, "lp-2st", **options)
    method = LP2ST(**options)
    parts = random_partition(400, method.stage_fractions, derive_seed(0, Stream.LPMST_SPLIT))
    positions = method.calibration_positions(0, len(parts[0]))
    calibration = set(parts[0][positions].tolist())
    assert len(calibration) == 14

    (name1, subset1, config1), (name2, subset2, config2) = fits
    assert (name1, name2) == ("stage1", "stage2")
    # Stage 1 trains on part 1 without the slice; stage 2 on everything, the slice too.
    assert set(subset1.tolist()) == set(parts[0].tolist()) - calibration
    assert calibration <= set(subset2.tolist()) and len(subset2) == 400
    assert (config1.mixup_alpha, config2.mixup_alpha) == (0.0, 2.0)
    assert metrics.method_details["stage_mixup"] == [0.0, 2.0]

    # The guard saw the slice's stage-1 RR labels, as released in stage1.noisy.pt.
    stage1 = torch.load(out / "stage1.noisy.pt")
    assert len(guarded) == 1 and torch.equal(guarded[0], stage1[positions])
    (record,) = metrics.method_details["prior_guard"]
    assert record["stage"] == 2 and record["calibration_examples"] == 14
    assert [c["temperature"] for c in record["candidates"]] == guard_temperatures(0.5) + [None]
    assert all(math.isfinite(c["estimate"]) for c in record["candidates"])
    assert record["choice"]["prior"] in ("model", "uniform")
    assert [e["mechanism"] for e in metrics.ledger["entries"]] == [
        "randomized-response",
        "rr-with-prior",
    ]


def test_a_collapsed_stage_1_model_gives_stage_2_plain_rr(data_dir, tmp_path, monkeypatch):
    priors = []
    original = RRWithPrior.privatize

    def spy(self, labels, prior, generator=None):
        priors.append(prior.cpu().clone())
        return original(self, labels, prior, generator)

    def collapsed(model, images, normalize, batch_size=1000):
        logits = torch.zeros(images.shape[0], 10, device=images.device)
        logits[:, 0] = 10.0
        return logits

    monkeypatch.setattr(RRWithPrior, "privatize", spy)
    monkeypatch.setattr(lp_mst, "predict_logits", collapsed)
    metrics = _run(data_dir, tmp_path / "bad", "lp-2st", epochs=1, epsilon=2.0)
    (record,) = metrics.method_details["prior_guard"]
    assert record["choice"] == {"prior": "uniform", "temperature": None}
    (prior,) = priors
    torch.testing.assert_close(prior, torch.full_like(prior, 0.1))
    sizes = metrics.method_details["stage_training_sizes"]
    assert sizes[1] == 400  # with the uniform prior nothing is dropped


def test_without_the_guard_stage_1_trains_on_all_of_part_1(data_dir, tmp_path, monkeypatch):
    fits = _spy_fits(monkeypatch)
    metrics = _run(
        data_dir, tmp_path / "off", "lp-mst", epochs=1, epsilon=4.0, stages=3, calibration_share=0
    )
    parts = random_partition(400, [0.6, 0.2, 0.2], derive_seed(0, Stream.LPMST_SPLIT))
    assert torch.equal(fits[0][1].sort().values, parts[0])
    assert metrics.method_details["prior_guard"] is None
    assert metrics.method_details["calibration_examples"] == 0
    assert len(metrics.ledger["entries"]) == 3 and metrics.epsilon == 4.0


def test_a_slice_that_leaves_stage_1_empty_is_refused_before_the_run():
    run = RunCheck(
        num_examples=2, num_classes=10, config=TrainConfig(epochs=1), build_model=lambda: None
    )
    with pytest.raises(ConfigError) as info:
        LP2ST(1.0, stage_fractions=[0.5, 0.5]).check(run)
    assert "calibration_share 0.05 holds out all 1 examples of stage 1" in str(info.value)
    LP2ST(1.0, stage_fractions=[0.5, 0.5], calibration_share=0).check(run)
