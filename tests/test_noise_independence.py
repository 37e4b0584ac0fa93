"""Runs that differ only in ε draw independent privacy noise (audit item 2), a rerun of
the same run reproduces its noise, and every ledger entry of a seeded run says that the
guarantee needs the seed secret (item 3)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from labeldp.runner import SEEDED_CONDITION, Environment, RunConfig, train_run
from labeldp.seeding import Stream, config_key, derive_seed
from labeldp.train import TrainConfig

N = 3000


pytestmark = pytest.mark.fake_fashion(n_train=N, n_test=50)


def _config(method: str, **options) -> RunConfig:
    return RunConfig(
        dataset="fashion-mnist",
        train=TrainConfig(epochs=1, batch_size=500, seed=3),
        method=method,
        method_options=options,
        crop_padding=0,
        model="cnn-tanh",
        norm="group",
    )


def _run(data_dir, out, config):
    env = Environment(data_dir=str(data_dir), download=False, progress=False)
    return train_run(config, out, env)


def _kept(run: Path, name: str, labels: np.ndarray) -> np.ndarray:
    return torch.load(run / f"{name}.noisy.pt", weights_only=True).numpy() == labels


def _true_labels(data_dir: Path) -> np.ndarray:
    from labeldp.data.formats import read_idx

    return read_idx(data_dir / "train-labels-idx1-ubyte.gz").astype(np.int64)


def test_rr_at_two_epsilons_keeps_labels_independently(data_dir, tmp_path):
    """RR keeps a label with probability e^ε/(e^ε + K − 1): 0.23 at ε = 1, 0.45 at ε = 2.
    Shared uniforms made every label kept at ε = 1 kept at ε = 2 too (P(both) = 0.23
    instead of 0.10); independent noise passes a χ² test of independence."""
    labels = _true_labels(data_dir)
    for eps in (1.0, 2.0):
        _run(data_dir, tmp_path / f"rr{eps}", _config("rr", epsilon=eps))
    a, b = (_kept(tmp_path / f"rr{eps}", "rr", labels) for eps in (1.0, 2.0))
    table = np.array([[np.sum(a & b), np.sum(a & ~b)], [np.sum(~a & b), np.sum(~a & ~b)]])
    assert stats.chi2_contingency(table).pvalue > 1e-4
    # and each is still RR at its own ε
    for kept, eps in ((a, 1.0), (b, 2.0)):
        p = np.exp(eps) / (np.exp(eps) + 9)
        assert stats.binomtest(int(kept.sum()), N, p).pvalue > 1e-4


def test_alibi_runs_at_two_epsilons_draw_independent_laplace_noise(data_dir, tmp_path):
    for eps in (1.0, 4.0):
        _run(data_dir, tmp_path / f"alibi{eps}", _config("alibi", epsilon=eps))
    noisy = [
        torch.load(tmp_path / f"alibi{eps}" / "alibi.noisy.pt", weights_only=True)
        for eps in (1.0, 4.0)
    ]
    labels = torch.from_numpy(_true_labels(data_dir))
    onehot = torch.nn.functional.one_hot(labels, 10).double()
    # the Laplace noise, rescaled to unit scale b = 2/ε: shared draws would be identical
    z = [(n.double() - onehot) * eps / 2 for n, eps in zip(noisy, (1.0, 4.0), strict=True)]
    r = stats.pearsonr(z[0].flatten().numpy(), z[1].flatten().numpy())
    assert abs(r.statistic) < 0.03 and r.pvalue > 1e-4


def test_a_rerun_of_the_same_run_reproduces_its_noise(data_dir, tmp_path):
    config = _config("rr", epsilon=1.0)
    _run(data_dir, tmp_path / "a", config)
    _run(data_dir, tmp_path / "b", config)
    noisy = [torch.load(tmp_path / r / "rr.noisy.pt", weights_only=True) for r in "ab"]
    assert torch.equal(*noisy)


def test_dp_sgd_noise_and_poisson_coins_are_keyed_by_the_configuration():
    """DP-SGD's noise stream and the batch stream (its Poisson coins) get distinct seeds
    for runs that differ only in ε, and equal ones for the same run."""
    one, two = (_config("dp-sgd", epsilon=e).to_dict() for e in (1.0, 2.0))
    for stream in (Stream.DPSGD_NOISE, Stream.EPOCH_BATCHES):
        seeds = [derive_seed(3, stream, 0, key=config_key(c)) for c in (one, two, one)]
        assert seeds[0] != seeds[1] and seeds[0] == seeds[2]
    assert derive_seed(3, Stream.RR_NOISE) != derive_seed(3, Stream.RR_NOISE, key=(0,))


def test_seeded_runs_state_their_condition_and_secure_runs_do_not(data_dir, tmp_path):
    seeded = _run(data_dir, tmp_path / "s", _config("rr", epsilon=1.0))
    secure = _run(data_dir, tmp_path / "t", _config("rr", epsilon=1.0, secure_noise=True))
    assert [e["condition"] for e in seeded.ledger["entries"]] == [SEEDED_CONDITION]
    assert [e["condition"] for e in secure.ledger["entries"]] == [""]
    stored = json.loads((tmp_path / "s" / "metrics.json").read_text())
    assert "seed is secret" in stored["ledger"]["entries"][0]["condition"]
