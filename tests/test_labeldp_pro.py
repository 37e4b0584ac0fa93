"""LabelDP-Pro against independent computations: the simplex projection and the hull
projection against scipy's constrained solver, the class gradients against one autograd
call per (example, class), zero noise giving back the ordinary gradient, the run's ε
against dp-accounting applied directly, and the sensitivity of a label change."""

from __future__ import annotations

import contextlib
import math

import dp_accounting
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import minimize
from torch import nn

from labeldp.errors import ConfigError
from labeldp.methods import build_method
from labeldp.privacy import Neighbouring
from labeldp.privacy.dpsgd_accounting import calibrate_dpsgd_noise, dpsgd_epsilon
from labeldp.train.dpsgd import DPSGDStep
from labeldp.train.labeldp_pro import (
    LabelDPProStep,
    ProjectionBatches,
    class_gradients,
    project_onto_hull,
    simplex_projection,
)
from labeldp.train.targets import HardLabels


def _scipy_simplex_ls(V: np.ndarray, g: np.ndarray) -> np.ndarray:
    """min ‖αᵀV − g‖² over the simplex, by SLSQP (an independent solver)."""
    m = V.shape[0]
    result = minimize(
        lambda a: float(np.sum((a @ V - g) ** 2)),
        np.full(m, 1 / m),
        jac=lambda a: 2 * V @ (a @ V - g),
        bounds=[(0, 1)] * m,
        constraints=[{"type": "eq", "fun": lambda a: a.sum() - 1, "jac": lambda a: np.ones(m)}],
        method="SLSQP",
        options={"ftol": 1e-14, "maxiter": 2000},
    )
    return result.x


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-5, 5), min_size=1, max_size=12))
def test_the_simplex_projection_is_the_closest_point_of_the_simplex(values):
    v = torch.tensor(values, dtype=torch.float64)
    p = simplex_projection(v)
    assert bool((p >= 0).all()) and abs(float(p.sum()) - 1) < 1e-12
    reference = _scipy_simplex_ls(np.eye(len(values)), np.array(values))
    assert float(torch.linalg.vector_norm(p - v)) <= np.linalg.norm(reference - values) + 1e-7


@pytest.mark.parametrize("seed", range(5))
def test_the_hull_projection_equals_a_constrained_least_squares_solve(seed):
    rng = np.random.default_rng(seed)
    m, d = int(rng.integers(3, 12)), int(rng.integers(2, 20))
    V = rng.normal(size=(m, d))
    g = rng.normal(size=d) * 2  # mostly outside the hull
    alpha = project_onto_hull(torch.from_numpy(V), torch.from_numpy(g), steps=3000).numpy()
    reference = _scipy_simplex_ls(V, g)
    ours, theirs = np.sum((alpha @ V - g) ** 2), np.sum((reference @ V - g) ** 2)
    assert alpha.min() >= 0 and abs(alpha.sum() - 1) < 1e-9
    assert ours <= theirs + 1e-6 * max(1.0, theirs)
    # the hull point is unique even when the weights are not
    np.testing.assert_allclose(alpha @ V, reference @ V, atol=1e-4)


def _linear(d_in: int = 5, k: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, 4), nn.Tanh(), nn.Linear(4, k))


@pytest.mark.parametrize("layerwise", [True, False], ids=["formulas", "torch.func"])
def test_class_gradients_equal_one_backward_per_example_and_class(layerwise, monkeypatch):
    from labeldp.train import labeldp_pro

    if not layerwise:
        monkeypatch.setattr(labeldp_pro, "layerwise_supported", lambda model: False)
    model, x = _linear(), torch.randn(4, 5)
    rows = class_gradients(model, x, num_classes=3, chunk=5)
    assert rows.shape == (12, sum(p.numel() for p in model.parameters()))
    for i in range(4):
        for k in range(3):
            model.zero_grad()
            nn.functional.cross_entropy(model(x[i : i + 1]), torch.tensor([k])).backward()
            expected = torch.cat([p.grad.flatten() for p in model.parameters()])
            torch.testing.assert_close(rows[i * 3 + k], expected, atol=1e-6, rtol=1e-5)


def test_without_noise_or_clipping_the_step_is_the_ordinary_gradient():
    # The whole dataset as the private batch and as the projection batch: the true labels'
    # mean gradient is the hull point with weight 1/N on each (example, true label).
    model, x, y = _linear(seed=1), torch.randn(8, 5), torch.randint(0, 3, (8,))
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    expected = torch.cat([p.grad.flatten() for p in model.parameters()])
    dpsgd = DPSGDStep(max_grad_norm=1e6, noise_multiplier=0.0, expected_batch_size=8)
    step = LabelDPProStep(
        dpsgd, ProjectionBatches(8, 8, lambda idx: x[idx], seed=0), num_classes=3,
        smoothing=1.0, projection_steps=5000,
    )  # fmt: skip
    model.zero_grad()
    step(model, x, torch.arange(8), HardLabels(y), contextlib.nullcontext)
    got = torch.cat([p.grad.flatten() for p in model.parameters()])
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=2e-3)
    assert step.last_projection["distance"] < 2e-4 * max(1.0, float(expected.norm()))


def test_smoothing_pulls_towards_the_uniform_weights():
    model, x = _linear(seed=2), torch.randn(6, 5)
    vertices = class_gradients(model, x, 3)
    target = vertices[0] * 3  # outside the hull
    alpha = project_onto_hull(vertices, target, steps=500)
    smoothed = 0.75 * alpha + 0.25 / alpha.numel()
    assert abs(float(smoothed.sum()) - 1) < 1e-9 and float(smoothed.min()) >= 0.25 / 18 - 1e-12


def test_the_projection_batches_read_no_label_and_repeat_per_epoch():
    seen = []
    batches = ProjectionBatches(100, 10, lambda idx: seen.append(idx.clone()) or idx, seed=3)
    batches.start_epoch(2)
    first = [batches.draw() for _ in range(3)]
    batches.start_epoch(2)
    again = [batches.draw() for _ in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert all(len(set(b.tolist())) == 10 for b in first)  # without replacement
    with pytest.raises(ConfigError, match="projection_batch must be an integer in 1..100"):
        ProjectionBatches(100, 101, lambda idx: idx, seed=0)


@pytest.mark.parametrize("sigma, q, steps", [(1.2, 0.02, 50), (3.0, 0.05, 200), (0.9, 1.0, 5)])
def test_the_replace_one_label_epsilon_is_dp_accountings(sigma, q, steps):
    gaussian = dp_accounting.GaussianDpEvent(sigma)
    event = gaussian if q == 1 else dp_accounting.PoissonSampledDpEvent(q, gaussian)
    direct = dp_accounting.pld.PLDAccountant(
        dp_accounting.NeighboringRelation.REPLACE_ONE, value_discretization_interval=1e-4
    )
    direct.compose(event, steps)
    ours = dpsgd_epsilon(sigma, q, steps, 1e-5, relation=Neighbouring.REPLACE_ONE_LABEL)
    assert ours == pytest.approx(direct.get_epsilon(1e-5), rel=1e-6)
    # a replacement costs more than an addition or removal at the same noise
    assert ours > dpsgd_epsilon(sigma, q, steps, 1e-5)


def test_a_labeldp_pro_plan_keeps_its_label_budget_and_is_refused_under_rdp():
    method = build_method("labeldp-pro", {"epsilon": 1.0})
    plan = method.plan(60000, 1024, 2)
    assert 0.99 <= plan.epsilon <= 1.0
    again = dpsgd_epsilon(plan.noise_multiplier, plan.sample_rate, plan.steps, 1e-5,
                          relation=Neighbouring.REPLACE_ONE_LABEL)  # fmt: skip
    assert again == pytest.approx(plan.epsilon)
    sigma = calibrate_dpsgd_noise(1.0, 1e-5, 1024 / 60000, plan.steps)
    assert plan.noise_multiplier > sigma  # a replacement needs more noise than a removal
    # its ε is plain label DP: no add/remove note in the reports, the audit tests ε itself
    from attacks.harness import bound_tested
    from labeldp.methods import METHODS

    assert METHODS["labeldp-pro"].epsilon_meaning is None
    ledger = {"ledger": {"relation": "replace one label"}}
    assert bound_tested("labeldp-pro", 1.0, 1e-5, ledger)["epsilon"] == 1.0
    with pytest.raises(ConfigError, match="accountant must be 'pld' for labeldp-pro"):
        build_method("labeldp-pro", {"epsilon": 1.0, "accountant": "rdp"})


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.floats(0.05, 3.0))
def test_changing_one_label_moves_the_clipped_sum_by_at_most_2c(seed, clip):
    torch.manual_seed(seed)
    model, x = _linear(seed=seed % 7), torch.randn(6, 5) * 3
    y = torch.randint(0, 3, (6,))
    changed = y.clone()
    changed[seed % 6] = (y[seed % 6] + 1 + seed % 2) % 3

    def clipped_sum(labels):
        step = DPSGDStep(max_grad_norm=clip, noise_multiplier=0.0, expected_batch_size=1.0)
        model.zero_grad()
        step(model, x, torch.arange(6), HardLabels(labels), contextlib.nullcontext)
        return torch.cat([p.grad.flatten() for p in model.parameters()]).double()

    moved = float(torch.linalg.vector_norm(clipped_sum(changed) - clipped_sum(y)))
    assert moved <= 2 * clip * (1 + 1e-5)
    assert math.isfinite(moved)


def test_the_jacobian_products_equal_the_materialised_vertices():
    from labeldp.train.labeldp_pro import ClassGradients, hull_weights

    model, x = _linear(seed=4), torch.randn(5, 5)
    V = class_gradients(model, x, 3).double()
    operator = ClassGradients(model, x)
    a, v = torch.rand(15, dtype=torch.float64), torch.randn(V.shape[1], dtype=torch.float64)
    torch.testing.assert_close(operator.combine(a), a @ V, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(operator.correlate(v), V @ v, atol=1e-5, rtol=1e-4)
    g = V[2] * 3
    ours = operator.combine(hull_weights(operator.combine, operator.correlate, 15, g, 2000))
    reference = torch.from_numpy(_scipy_simplex_ls(V.numpy(), g.numpy())) @ V
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=1e-3)


def test_a_diverged_gradient_is_left_for_the_loop_to_detect():
    model, x, y = _linear(seed=5), torch.randn(8, 5), torch.randint(0, 3, (8,))
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    step = LabelDPProStep(
        DPSGDStep(max_grad_norm=1.0, noise_multiplier=1.0, expected_batch_size=8),
        ProjectionBatches(8, 4, lambda idx: x[idx], seed=0), num_classes=3,
    )  # fmt: skip
    step(model, x, torch.arange(8), HardLabels(y), contextlib.nullcontext)  # no exception
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert not bool(torch.isfinite(grads).all())


def test_the_epoch_statistics_are_the_means_of_the_steps_norms():
    # Each step's numbers recomputed from what the step hands the optimizer (ĝ in p.grad)
    # and from the noisy gradient g̃ it started from (DP-SGD alone, same seed and stream).
    model, x, y = _linear(seed=6), torch.randn(8, 5), torch.randint(0, 3, (8,))

    def dpsgd() -> DPSGDStep:
        return DPSGDStep(max_grad_norm=1.0, noise_multiplier=2.0, expected_batch_size=8, seed=3)

    step = LabelDPProStep(
        dpsgd(), ProjectionBatches(8, 4, lambda idx: x[idx], seed=0), num_classes=3
    )
    plain = dpsgd()
    step.start_epoch(0)
    plain.start_epoch(0)
    seen: dict[str, list[float]] = {"noisy_norm": [], "projected_norm": [], "distance": []}
    for _ in range(3):
        model.zero_grad()
        plain(model, x, torch.arange(8), HardLabels(y), contextlib.nullcontext)
        noisy = torch.cat([p.grad.flatten() for p in model.parameters()])
        model.zero_grad()
        step(model, x, torch.arange(8), HardLabels(y), contextlib.nullcontext)
        projected = torch.cat([p.grad.flatten() for p in model.parameters()])
        seen["noisy_norm"].append(float(noisy.norm()))
        seen["projected_norm"].append(float(projected.norm()))
        seen["distance"].append(float((projected - noisy).norm()))
    stats = step.epoch_statistics()
    for k, values in seen.items():
        assert stats[f"projection_{k}"] == pytest.approx(sum(values) / 3, rel=1e-5)
    assert seen["distance"][0] > 0  # the noise left the hull: the projection moved it
    step.start_epoch(1)
    assert step.epoch_statistics() == {}


def test_with_clipping_and_no_noise_the_step_is_the_clipped_mean_gradient():
    # C far below the gradients' norms: DP-SGD's noiseless step is the mean of the clipped
    # true-label gradients (the whole dataset as its batch), and with the same examples as
    # the projection batch that mean is the hull point of weight 1/N on each (example, true
    # label) of the clipped vertices: the projection must return it. Reference: autograd,
    # one backward per example, clipped by hand.
    model, x, y = _linear(seed=7), torch.randn(8, 5) * 3, torch.randint(0, 3, (8,))
    rows = []
    for i in range(8):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        rows.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    grads = torch.stack(rows)
    clip = 0.2 * float(grads.norm(dim=1).min())
    expected = (grads * (clip / grads.norm(dim=1, keepdim=True))).mean(0)
    dpsgd = DPSGDStep(max_grad_norm=clip, noise_multiplier=0.0, expected_batch_size=8)
    step = LabelDPProStep(
        dpsgd, ProjectionBatches(8, 8, lambda idx: x[idx], seed=0), num_classes=3,
        smoothing=1.0, projection_steps=5000, clip_vertices=True,
    )  # fmt: skip
    model.zero_grad()
    step(model, x, torch.arange(8), HardLabels(y), contextlib.nullcontext)
    got = torch.cat([p.grad.flatten() for p in model.parameters()])
    torch.testing.assert_close(got, expected, atol=2e-4 * clip, rtol=2e-3)


def test_the_clipped_jacobian_products_equal_the_clipped_materialised_vertices():
    from labeldp.train.labeldp_pro import ClassGradients, class_gradient_norms, clip_factors

    model, x = _linear(seed=8), torch.randn(5, 5) * 2
    V = class_gradients(model, x, 3).double()
    norms = class_gradient_norms(model, x, 3)
    torch.testing.assert_close(norms.double(), V.norm(dim=1), atol=1e-5, rtol=1e-5)
    clip = float(V.norm(dim=1).median())  # some vertices clipped, some not
    factors = clip_factors(norms, clip)
    assert 0 < int((factors < 1).sum()) < 15
    clipped = V * (clip / V.norm(dim=1, keepdim=True)).clamp(max=1)
    operator = ClassGradients(model, x, factors)
    a, v = torch.rand(15, dtype=torch.float64), torch.randn(V.shape[1], dtype=torch.float64)
    torch.testing.assert_close(operator.combine(a), a @ clipped, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(operator.correlate(v), clipped @ v, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("clip_vertices", [True, False])
def test_both_paths_project_onto_the_same_vertices(clip_vertices, monkeypatch):
    # The materialised path and the Jacobian-product path (forced by a zero threshold) give
    # the same step: both project onto the hull of the (clipped) class gradients.
    from labeldp.train import labeldp_pro

    model, x, y = _linear(seed=9), torch.randn(8, 5) * 3, torch.randint(0, 3, (8,))
    steps = []
    for threshold in (labeldp_pro.MAX_MATERIALISED, 0):
        monkeypatch.setattr(labeldp_pro, "MAX_MATERIALISED", threshold)
        step = LabelDPProStep(
            DPSGDStep(max_grad_norm=0.3, noise_multiplier=1.0, expected_batch_size=8, seed=1),
            ProjectionBatches(8, 4, lambda idx: x[idx], seed=0), num_classes=3,
            projection_steps=300, clip_vertices=clip_vertices,
        )  # fmt: skip
        step.start_epoch(0)  # seeds the noise and the projection batches
        model.zero_grad()
        step(model, x, torch.arange(8), HardLabels(y), contextlib.nullcontext)
        steps.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(steps[0], steps[1], atol=1e-4, rtol=1e-3)
    if clip_vertices:
        assert float(steps[0].norm()) <= 0.3 + 1e-6  # a convex combination of clipped ones


@pytest.mark.parametrize("clip_vertices", [True, False])
def test_with_full_smoothing_the_step_is_the_mean_of_the_class_gradients(clip_vertices):
    # λ = 0 leaves only the uniform weights: the step is the mean over the projection batch's
    # (example, class) gradients (autograd), each clipped to C by hand if clip_vertices.
    model, x, y = _linear(seed=10), torch.randn(6, 5) * 3, torch.randint(0, 3, (6,))
    rows = []
    for i in range(6):
        for k in range(3):
            model.zero_grad()
            nn.functional.cross_entropy(model(x[i : i + 1]), torch.tensor([k])).backward()
            rows.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    vertices = torch.stack(rows)
    clip = float(vertices.norm(dim=1).median())
    if clip_vertices:
        vertices = vertices * (clip / vertices.norm(dim=1, keepdim=True)).clamp(max=1)
    expected = vertices.mean(0)
    step = LabelDPProStep(
        DPSGDStep(max_grad_norm=clip, noise_multiplier=1.0, expected_batch_size=6, seed=2),
        ProjectionBatches(6, 6, lambda idx: x[idx], seed=0), num_classes=3, smoothing=0.0,
        clip_vertices=clip_vertices,
    )  # fmt: skip
    step.start_epoch(0)
    model.zero_grad()
    step(model, x, torch.arange(6), HardLabels(y), contextlib.nullcontext)
    got = torch.cat([p.grad.flatten() for p in model.parameters()])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
