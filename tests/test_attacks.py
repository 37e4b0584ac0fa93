"""The attack harness: exact statistics against scipy, sanity anchors (a randomized-response
"model" is bounded by its ε; a memorizing model is caught), canaries planted before any
method sees a label."""

from __future__ import annotations

import json
import math

import pytest
import torch
from scipy import stats

from attacks import memorization, one_run
from attacks.canaries import plant
from attacks.harness import (
    ADD_REMOVE_ONE_EXAMPLE,
    REPLACE_ONE_LABEL,
    attack_run,
    bound_tested,
    format_table,
    judge,
)
from attacks.memorization import memorization_attack
from attacks.one_run import audit, epsilon_lower_bound
from attacks.stats import (
    clopper_pearson_lower,
    clopper_pearson_upper,
    dp_p_value,
    epsilon_from_error_rates,
)
from labeldp import cli
from labeldp.mechanisms import RandomizedResponse
from labeldp.records import AttackRecord
from labeldp.runner import Environment, RunConfig, train_run
from labeldp.train import TrainConfig

GRID = [
    (r, v)
    for r in (1, 7, 50, 333)
    for v in sorted({0, 1, r // 2, (3 * r) // 4, r - 1, r})
    if 0 <= v <= r
]


@pytest.mark.parametrize("r,v", GRID)
def test_clopper_pearson_matches_scipy(r, v):
    ci = stats.binomtest(v, r, alternative="greater").proportion_ci(0.95, method="exact")
    assert clopper_pearson_lower(r, v) == pytest.approx(ci.low, abs=1e-12)
    ci = stats.binomtest(v, r, alternative="less").proportion_ci(0.95, method="exact")
    assert clopper_pearson_upper(r, v) == pytest.approx(ci.high, abs=1e-12)


@pytest.mark.parametrize("r,v", GRID)
def test_epsilon_lower_bound_is_where_the_binomial_p_value_crosses_alpha(r, v):
    eps = epsilon_lower_bound(r, v, alpha=0.05)
    assert eps >= 0
    if eps == 0:
        assert dp_p_value(r, v, 0.0) > 0.05 - 1e-12  # even ε = 0 is not rejected
    elif math.isfinite(eps):
        assert dp_p_value(r, v, eps) == pytest.approx(0.05, rel=1e-6)
        assert dp_p_value(r, v, eps * 0.99) < 0.05 < dp_p_value(r, v, eps * 1.01 + 1e-9)
    # The p-value itself against scipy's binomial tail.
    p = 1 / (1 + math.exp(-1.0))
    assert dp_p_value(r, v, 1.0) == pytest.approx(
        stats.binom.sf(v - 1, r, p), rel=1e-12, abs=1e-300
    )


def test_epsilon_lower_bound_is_monotone_and_validates():
    assert (
        epsilon_lower_bound(100, 90) > epsilon_lower_bound(100, 80) > epsilon_lower_bound(100, 60)
    )
    assert epsilon_lower_bound(100, 90, alpha=0.01) < epsilon_lower_bound(100, 90, alpha=0.05)
    assert epsilon_lower_bound(0, 0) == 0.0 and epsilon_lower_bound(100, 50) == 0.0
    with pytest.raises(ValueError, match="num_correct must be an integer in 0..num_guesses=5"):
        epsilon_lower_bound(5, 6)
    with pytest.raises(ValueError, match="alpha must be in"):
        epsilon_lower_bound(5, 5, alpha=1.5)


def test_error_rate_bound_is_conservative_and_informative():
    # A perfect distinguisher on 1000 + 1000 trials gives a large bound; a coin gives 0.
    assert epsilon_from_error_rates(1000, 1000, 0, 1000) > 5
    assert epsilon_from_error_rates(500, 1000, 500, 1000) == 0.0


def _rr_model_outputs(eps: float, k: int, labels: torch.Tensor, seed: int) -> torch.Tensor:
    """A "model" whose output is the RR label itself: exactly ε-DP in the training label."""
    noisy = RandomizedResponse(eps, k).privatize(labels, torch.Generator().manual_seed(seed))
    return torch.nn.functional.one_hot(noisy, k).double()


@pytest.mark.parametrize("eps", [0.5, 1.0, 2.0, 4.0])
def test_a_randomized_response_model_is_bounded_by_its_epsilon_and_close_to_it(eps):
    k, m = 10, 40_000
    labels = torch.randint(0, k, (m,), generator=torch.Generator().manual_seed(0))
    c = plant(labels, k, m // 2, m // 2, 100, torch.Generator().manual_seed(1))
    trained_with = c.training_labels(labels)
    probs = _rr_model_outputs(eps, k, trained_with, seed=2)
    mem = memorization_attack(
        probs[c.indices], c.canary_labels, c.other_labels, torch.Generator().manual_seed(3)
    )
    rows = torch.arange(len(c.audit_indices))
    one = audit(
        probs[c.audit_indices][rows, c.audit_a],
        probs[c.audit_indices][rows, c.audit_b],
        c.audit_is_a,
    )
    for result in (mem, one):
        assert result["epsilon_lb"] <= eps
        assert result["epsilon_lb"] >= eps - 0.25  # many canaries: close to ε


def _perfect_cap(num_guesses: int, alpha: float) -> float:
    """ε_LB of num_guesses right guesses out of num_guesses, brute force: the exact
    Clopper–Pearson lower bound from scipy's Beta quantile, checked against the binomial
    tail it inverts, then its log-odds (0 when it does not pass 1/2)."""
    low = stats.beta.ppf(alpha, num_guesses, 1)  # v = r: Beta(r, 1), i.e. α^(1/r)
    assert stats.binom.sf(num_guesses - 1, num_guesses, low) == pytest.approx(alpha, rel=1e-9)
    return max(0.0, math.log(low / (1 - low)))


@pytest.mark.parametrize("m", [1, 2, 7, 20, 101, 500, 1000])
def test_the_cap_is_the_bound_of_a_perfect_attack(m):
    alpha = 0.05
    # Memorization: every guess right on the measurement half, m - m // 2 canaries.
    assert memorization.epsilon_lb_max(m, alpha) == pytest.approx(
        _perfect_cap(m - m // 2, alpha), rel=1e-9
    )
    # One run: every guess right at the largest r (= m), at the Bonferroni level.
    sizes = one_run.guess_sizes(m)
    assert sizes[0] == m
    assert one_run.epsilon_lb_max(m, alpha) == pytest.approx(
        max(_perfect_cap(r, alpha / len(sizes)) for r in sizes), rel=1e-9
    )
    # A perfect attack reaches it: a model that puts all its mass on the trained label.
    k = 10
    labels = torch.randint(0, k, (4 * m + 10,), generator=torch.Generator().manual_seed(m))
    c = plant(labels, k, m, m, 0, torch.Generator().manual_seed(1))
    probs = torch.nn.functional.one_hot(c.training_labels(labels), k).double()
    mem = memorization_attack(
        probs[c.indices], c.canary_labels, c.other_labels, torch.Generator().manual_seed(2)
    )
    rows = torch.arange(m)
    one = audit(
        probs[c.audit_indices][rows, c.audit_a],
        probs[c.audit_indices][rows, c.audit_b],
        c.audit_is_a,
    )
    for result in (mem, one):
        assert result["epsilon_lb"] == pytest.approx(result["epsilon_lb_max"], rel=1e-12)


def test_the_caps_of_the_shipped_canary_counts():
    # 1000 + 1000 canaries (full and audit profiles): what the auditor found.
    assert round(memorization.epsilon_lb_max(1000), 2) == 5.11
    assert round(one_run.epsilon_lb_max(1000), 2) == 5.38
    # 500 + 500 (quick profile).
    assert round(memorization.epsilon_lb_max(500), 2) == 4.42
    assert round(one_run.epsilon_lb_max(500), 2) == 4.68
    # More canaries, a higher cap; a smaller α, a lower one.
    assert memorization.epsilon_lb_max(2000) > memorization.epsilon_lb_max(1000)
    assert one_run.epsilon_lb_max(1000, 0.01) < one_run.epsilon_lb_max(1000, 0.05)
    assert memorization.epsilon_lb_max(0) == one_run.epsilon_lb_max(0) == 0.0


@pytest.mark.parametrize("eps", [1.0, 4.0, 8.0, 30.0])
@pytest.mark.parametrize("m", [20, 200])
def test_a_real_attack_never_exceeds_its_cap(eps, m):
    k = 10
    labels = torch.randint(0, k, (4 * m,), generator=torch.Generator().manual_seed(0))
    for seed in range(3):
        c = plant(labels, k, m, m, 0, torch.Generator().manual_seed(seed))
        probs = _rr_model_outputs(eps, k, c.training_labels(labels), seed=seed + 10)
        # Blur the one-hot "model" with noise so that the attack's thresholds matter.
        noise = torch.rand(
            probs.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
        )
        probs = torch.softmax(4 * probs + noise, dim=1)
        mem = memorization_attack(
            probs[c.indices], c.canary_labels, c.other_labels, torch.Generator().manual_seed(seed)
        )
        rows = torch.arange(m)
        one = audit(
            probs[c.audit_indices][rows, c.audit_a],
            probs[c.audit_indices][rows, c.audit_b],
            c.audit_is_a,
        )
        assert 0 <= mem["epsilon_lb"] <= mem["epsilon_lb_max"] == memorization.epsilon_lb_max(m)
        assert 0 <= one["epsilon_lb"] <= one["epsilon_lb_max"] == one_run.epsilon_lb_max(m)
        for row in one["by_guesses"]:
            assert row["epsilon_lb"] <= one["epsilon_lb_max"]


def test_the_bound_tested_follows_the_relation_of_the_methods_epsilon():
    for method in ("rr", "lp-mst", "lp-2st", "alibi", "pate-fm"):
        tested = bound_tested(method, 2.0, 1e-5)
        assert tested["relation"] == REPLACE_ONE_LABEL
        assert (tested["epsilon"], tested["delta"]) == (2.0, 1e-5)
    # DP-SGD's ε is for adding or removing an example; a label change is both: (2ε, (1+e^ε)δ).
    tested = bound_tested("dp-sgd", 2.0, 1e-5)
    assert tested["relation"] == ADD_REMOVE_ONE_EXAMPLE
    assert tested["epsilon"] == 4.0 and tested["delta"] == pytest.approx((1 + math.e**2) * 1e-5)
    assert bound_tested("none", math.inf, None)["epsilon"] == math.inf  # no claim: ∞
    assert bound_tested("none", None, None)["epsilon"] == math.inf  # as older callers said it
    # A ledger that names its relation is taken at its word.
    ledger = {
        "ledger": {"entries": [{"details": {"neighboring_relation": ADD_REMOVE_ONE_EXAMPLE}}]}
    }
    assert bound_tested("some-new-method", 1.0, 0.0, ledger)["epsilon"] == 2.0
    # Judging: above the bound is a violation; a bound at or above the cap cannot fail.
    part = {"epsilon_lb": 1.2, "epsilon_lb_max": 5.11}
    assert judge(dict(part), 1.0) == {**part, "exceeds_bound": True, "can_fail": True}
    assert judge(dict(part), 8.0)["can_fail"] is False
    assert judge(dict(part), 5.11)["can_fail"] is False
    assert judge(dict(part), math.inf) == {**part, "exceeds_bound": False, "can_fail": False}
    assert judge(dict(part), None) == {**part, "exceeds_bound": False, "can_fail": False}


pytestmark = pytest.mark.fake_fashion(n_train=400, n_test=100)


def test_canaries_are_planted_before_the_method_sees_labels(data_dir, tmp_path, monkeypatch):
    seen = {}
    original = RandomizedResponse.privatize

    def spy(self, labels, generator=None):
        seen["labels"] = labels.clone()
        return original(self, labels, generator)

    monkeypatch.setattr(RandomizedResponse, "privatize", spy)
    config = RunConfig(
        dataset="fashion-mnist",
        train=TrainConfig(epochs=1, batch_size=50),
        method="rr",
        method_options={"epsilon": 1.0},
        canaries=40,
        audit_canaries=30,
    )
    train_run(config, tmp_path / "run", Environment(data_dir=str(data_dir), progress=False))
    c = torch.load(tmp_path / "run" / "diagnostics" / "canaries.pt", weights_only=True)
    assert torch.equal(seen["labels"][c["indices"]], c["canary_labels"])
    audit_labels = torch.where(c["audit_is_a"], c["audit_a"], c["audit_b"])
    assert torch.equal(seen["labels"][c["audit_indices"]], audit_labels)
    assert len(c["control_indices"]) == 40
    outputs = torch.load(tmp_path / "run" / "diagnostics" / "outputs.pt", weights_only=True)
    assert outputs["canary"]["softmax"].shape == (40, 10) and outputs["audit"]["softmax"].shape == (
        30,
        10,
    )


def test_canary_choice_is_label_independent_and_labels_are_wrong_and_uniform():
    g = lambda: torch.Generator().manual_seed(9)  # noqa: E731
    a = plant(torch.zeros(5000, dtype=torch.long), 10, 3000, 1000, 50, g())
    b = plant(torch.arange(5000) % 10, 10, 3000, 1000, 50, g())
    assert torch.equal(a.indices, b.indices) and torch.equal(a.audit_indices, b.audit_indices)
    assert not set(b.indices.tolist()) & set(b.audit_indices.tolist())
    assert bool((b.canary_labels != b.original_labels).all())
    assert bool(((b.other_labels != b.original_labels) & (b.other_labels != b.canary_labels)).all())
    offsets = torch.bincount((b.canary_labels - b.original_labels) % 10, minlength=10)[1:]
    assert stats.chisquare(offsets.numpy()).pvalue > 1e-4
    assert bool((b.audit_a != b.audit_b).all())
    true_audit = (torch.arange(5000) % 10)[b.audit_indices]
    assert bool(((b.audit_a != true_audit) & (b.audit_b != true_audit)).all())
    assert stats.binomtest(int(b.audit_is_a.sum()), 1000).pvalue > 1e-4


def test_a_memorizing_non_private_model_gives_a_large_lower_bound(data_dir, tmp_path):
    config = RunConfig(
        dataset="fashion-mnist",
        train=TrainConfig(epochs=40, batch_size=50, lr=0.05),
        crop_padding=0,
        hflip=False,
        canaries=100,
        audit_canaries=100,
    )
    train_run(config, tmp_path / "none", Environment(data_dir=str(data_dir), progress=False))
    result = attack_run(tmp_path / "none")
    assert result.memorization["epsilon_lb"] > 1.5
    assert result.one_run["epsilon_lb"] > 1.5
    assert result.memorization["epsilon_lb_max"] == memorization.epsilon_lb_max(100)
    assert result.one_run["epsilon_lb_max"] == one_run.epsilon_lb_max(100)
    for part in ("memorization", "one_run"):
        assert result.part(part)["epsilon_lb"] <= result.part(part)["epsilon_lb_max"]
        assert result.part(part)["exceeds_bound"] is False  # no claim to violate
    assert result.label_inference["gap"] > 0
    stored = json.loads((tmp_path / "none" / "attack.json").read_text())
    assert stored["method"] == "none" and AttackRecord.from_json(stored) == result
    # a non-private run claims ε = ∞: "Infinity", never null, wherever attack.json says it
    assert stored["epsilon"] == stored["bound_tested"]["epsilon"] == "Infinity"
    assert stored["delta"] is None and stored["bound_tested"]["delta"] is None


def test_attack_cli_on_runs_with_and_without_canaries(data_dir, tmp_path, capsys):
    base = [
        "train",
        "--dataset",
        "fashion-mnist",
        "--epochs",
        "1",
        "--batch-size",
        "50",
        "--data-dir",
        str(data_dir),
        "--quiet",
    ]
    assert cli.main([*base, "--out", str(tmp_path / "plain")]) == 0
    assert (
        cli.main(
            [
                *base,
                "--out",
                str(tmp_path / "rr"),
                "--method",
                "rr",
                "--epsilon",
                "2",
                "--canaries",
                "40",
                "--audit-canaries",
                "40",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert cli.main(["attack", str(tmp_path / "plain"), str(tmp_path / "rr")]) == 0
    out = capsys.readouterr().out
    assert "ε_LB memorization" in out and "no canaries in this run" in out
    assert "bound tested" in out and "max" in out
    result = json.loads((tmp_path / "rr" / "attack.json").read_text())
    assert result["memorization"]["epsilon_lb"] <= 2 and result["one_run"]["epsilon_lb"] <= 2
    assert result["bound_tested"]["epsilon"] == 2 and result["bound_tested"]["relation"] == (
        REPLACE_ONE_LABEL
    )
    # 40 canaries certify at most 1.82 (memorization, 20 measured) and 2.10 (one run): the
    # memorization attack cannot refute ε = 2, the one-run audit could.
    assert result["memorization"]["epsilon_lb_max"] == pytest.approx(
        memorization.epsilon_lb_max(40)
    )
    assert result["memorization"]["can_fail"] is False and result["one_run"]["can_fail"] is True
    assert any("cannot refute it" in note for note in result["notes"])
    assert "†" in format_table([AttackRecord.from_json(result)])
    assert cli.main(["attack", str(tmp_path / "missing")]) == 2
