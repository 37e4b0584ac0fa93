"""Canaries and audits on a federation's final global model (labeldp.fl.run with
``canaries`` / ``audit_canaries`` / ``canary_clients``, attacks.harness on its folder)."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from fakes import isolate_data_sources, write_learnable_fashion

import labeldp.fl.run as fl_run
from attacks.canaries import Canaries
from attacks.harness import attack_run
from labeldp.cli import main
from labeldp.data import DATASETS
from labeldp.data.dataset import DeviceDataset
from labeldp.errors import ConfigError
from labeldp.fl.options import FederationOptions, build_population
from labeldp.fl.population import iid
from labeldp.fl.report import summary_table
from labeldp.fl.run import FederationRecord, plant_federation_canaries
from labeldp.fl.study import FederatedSweep
from labeldp.records import AttackRecord
from labeldp.seeding import Stream, derive_seed

TINY = ["--quiet", "--clients", "20", "--concurrency", "5", "--buffer-size", "5",
        "--server-steps", "4", "--local-batch", "8", "--local-lr", "0.1"]  # fmt: skip


@pytest.fixture
def data(tmp_path, monkeypatch):
    isolate_data_sources(monkeypatch, tmp_path)
    return write_learnable_fashion(tmp_path / "data", n_train=400, n_test=100)


@pytest.fixture
def seen(monkeypatch):
    """What run_folder hands the simulator: the training labels and the population."""
    calls = []
    simulate = fl_run.run_federation

    def spy(config, train, test, population, *args):
        calls.append({"labels": train.labels.clone(), "population": population})
        return simulate(config, train, test, population, *args)

    monkeypatch.setattr(fl_run, "run_federation", spy)
    return calls


def read(path):
    return json.loads(path.read_text())


def test_canaries_are_audited_against_the_label_epsilon(tmp_path, data, seen):
    out = tmp_path / "run"
    args = ["fl", "--out", str(out), "--data-dir", str(data), *TINY, "--layout", "dirichlet",
            "--alpha", "1", "--label-privacy", "rr", "--epsilon", "2", "--canaries", "20",
            "--audit-canaries", "40", "--clip", "1", "--noise-multiplier", "1",
            "--participation-cap", "5"]  # fmt: skip
    assert main(args) == 0
    attack = AttackRecord.from_json(read(out / "attack.json"))
    assert attack.bound_tested["relation"] == "replace one label"
    assert attack.epsilon == attack.bound_tested["epsilon"] == 2.0  # the label ε
    for part in (attack.memorization, attack.one_run):
        assert 0 <= part["epsilon_lb"] < math.inf and part["epsilon_lb"] <= part["epsilon_lb_max"]
    assert attack.memorization["canaries"] == 20 and attack.one_run["canaries"] == 40
    metrics = read(out / "metrics.json")
    record = FederationRecord.from_json(metrics)
    assert FederationRecord.from_json(json.loads(json.dumps(record.to_json()))) == record
    user = record.history[-1]["user_epsilon"]
    assert math.isfinite(user) and user != 2.0  # user-level DP on, and never the one tested
    assert record.attack["epsilon_tested"] == record.label_epsilon == 2.0
    assert record.attack["relation"] == "replace one label"
    assert record.epsilon_lb == {
        "memorization": attack.memorization["epsilon_lb"],
        "one_run": attack.one_run["epsilon_lb"],
    }
    # the clients train on the planted labels; the layout was dealt from the true ones
    canaries = Canaries.load(out / "diagnostics" / "canaries.pt")
    labels = seen[0]["labels"].cpu()
    assert torch.equal(labels[canaries.indices], canaries.canary_labels)
    audit = torch.where(canaries.audit_is_a, canaries.audit_a, canaries.audit_b)
    assert torch.equal(labels[canaries.audit_indices], audit)
    assert bool((canaries.canary_labels != canaries.original_labels).all())
    true = _true_labels(data)
    assert torch.equal(labels, canaries.training_labels(true))
    options = FederationOptions(layout="dirichlet", alpha=1.0, clients=20)
    layout = build_population(options, true.numpy(), derive_seed(0, Stream.FL_POPULATION))
    assert np.array_equal(layout.indices, seen[0]["population"].indices)
    # `labeldp attack` on the finished folder finds the same
    again = attack_run(out)
    assert again.memorization["epsilon_lb"] == attack.memorization["epsilon_lb"]
    assert again.one_run["epsilon_lb"] == attack.one_run["epsilon_lb"]
    assert main(args) == 0  # finished: read back, not rerun
    assert len(seen) == 1


def test_without_label_dp_nothing_is_claimed_and_first_gathers_canaries(tmp_path, data, seen):
    out = tmp_path / "run"
    args = ["fl", "--out", str(out), "--data-dir", str(data), *TINY, "--layout", "iid",
            "--canaries", "10", "--audit-canaries", "10", "--canary-clients", "first"]  # fmt: skip
    assert main(args) == 0
    attack = AttackRecord.from_json(read(out / "attack.json"))
    assert math.isinf(attack.bound_tested["epsilon"]) and attack.bound_tested["relation"] is None
    assert read(out / "metrics.json")["attack"]["epsilon_tested"] == "Infinity"
    record = FederationRecord.from_json(read(out / "metrics.json"))
    assert math.isinf(record.attack["epsilon_tested"])
    assert not record.attack["memorization"]["exceeds_bound"]
    canaries = Canaries.load(out / "diagnostics" / "canaries.pt")
    planted = torch.cat([canaries.indices, canaries.audit_indices]).numpy()
    population = seen[0]["population"]
    assert set(planted) <= set(population.client(0).tolist())
    others = population.indices[population.offsets[1] :]
    assert not np.isin(others, planted).any()  # no canary anywhere else
    assert population.num_held == 400 and "canaries in client 0" in population.layout
    assert record.provenance["population"] == population.layout


def test_canaries_are_chosen_without_looking_at_labels():
    info = DATASETS["fashion-mnist"]
    images = torch.zeros(200, 1, 28, 28, dtype=torch.uint8)
    options = FederationOptions(canaries=5, audit_canaries=7)
    chosen = []
    for labels in (torch.arange(200) % 10, torch.zeros(200, dtype=torch.long)):
        canaries = plant_federation_canaries(options, 3, DeviceDataset(images, labels, info), 50)
        chosen.append(torch.cat([canaries.indices, canaries.audit_indices]))
    assert torch.equal(*chosen)
    assert plant_federation_canaries(FederationOptions(), 3, None, 50) is None
    with pytest.raises(ConfigError, match="at most 199"):
        plant_federation_canaries(
            FederationOptions(canaries=200), 3, DeviceDataset(images, labels, info), 50
        )


def test_spread_keeps_the_layout_and_first_refuses_to_empty_a_client():
    labels = np.arange(100) % 10
    canaries = np.array([3, 50, 97])
    spread = FederationOptions(layout="iid", clients=10)
    assert np.array_equal(
        build_population(spread, labels, 1, canaries).indices, iid(100, 10, 1).indices
    )
    first = FederationOptions(layout="iid", clients=100, canary_clients="first")
    with pytest.raises(ConfigError, match="no example"):
        build_population(first, labels, 1, canaries)  # one example per client


def test_the_summary_shows_each_audits_mean_epsilon_lb(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text(
        'name = "s"\nkind = "federation"\nseeds = [0, 1]\ntarget_accuracy = 0.5\n'
        '[grid]\nalgorithm = ["fedbuff"]\n'
    )
    spec = FederatedSweep.load(path)
    row = {"variant": "fedbuff", "algorithm": "fedbuff", "final_accuracy": 0.5,
           "time_to_target": 1.0, "trips_to_target": 2.0, "steps_to_target": 3.0,
           "staleness_mean": 1.0, "staleness_p99": 2.0, "achieved_concurrency": 5.0,
           "dropped": 0, "label_epsilon": 2.0, "seconds": 1.0}  # fmt: skip
    plain = pd.DataFrame([row, row])
    assert "ε_LB" not in "\n".join(summary_table(plain, spec))
    audited = pd.DataFrame([
        {**row, "epsilon_lb_memorization": 0.5, "epsilon_lb_one_run": math.nan},
        {**row, "epsilon_lb_memorization": 1.0, "epsilon_lb_one_run": 0.25},
    ])  # fmt: skip
    lines = summary_table(audited, spec)
    assert "| label ε | ε_LB memorization | ε_LB one-run | wall s |" in lines[0]
    assert "| 2 | 0.75 | 0.25 (1/2) | 1 |" in lines[2]
    assert lines[1].count("|") == lines[0].count("|")


def _true_labels(folder) -> torch.Tensor:
    from labeldp.data.dataset import load_splits

    return load_splits("fashion-mnist", data_dir=str(folder), device="cpu")[0].labels
