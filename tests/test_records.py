"""The typed records (labeldp.records, DPSGDPlan): one JSON form each, a lossless round
trip, strict JSON, the one convention for ∞ ("Infinity", never null) and the older forms
that results/runs.sqlite still holds (ε null, ε_LB "inf")."""

from __future__ import annotations

import json
import math
import sqlite3

import pytest
from fakes import attack_record, run_record
from hypothesis import given, settings
from hypothesis import strategies as st

from labeldp.errors import DataError
from labeldp.methods.dpsgd import DPSGDMethod, DPSGDPlan
from labeldp.records import (
    AttackRecord,
    EpochRecord,
    RunRecord,
    number_from_json,
    number_to_json,
    to_json_value,
)
from labeldp.runner import read_run_record
from labeldp.store import SCHEMA, ResultsStore

FAST = settings(max_examples=60, deadline=None, derandomize=True)


def _strict(data: dict) -> dict:
    """``data`` through strict JSON text and back, as a file would hold it."""
    return json.loads(json.dumps(data, allow_nan=False))


# labeldp flushes denormals to zero on CPU (cpu_numerics; a process-wide setting that
# earlier tests turn on), so no subnormal floats are drawn
finite = st.floats(allow_nan=False, allow_infinity=False, width=64, allow_subnormal=False)
maybe_infinite = st.floats(allow_nan=False, allow_subnormal=False) | st.sampled_from(
    [math.inf, -math.inf]
)
share = st.floats(0, 1, allow_subnormal=False)
text = st.text(max_size=8)
json_leaf = st.none() | st.booleans() | st.integers(-(10**6), 10**6) | finite | text
json_obj = st.dictionaries(
    st.text(min_size=1, max_size=6), st.recursive(json_leaf, lambda c: st.lists(c, max_size=3))
)

epochs = st.builds(
    EpochRecord,
    epoch=st.integers(1, 1000),
    lr=st.floats(0, 10, allow_subnormal=False),
    train_loss=st.none() | maybe_infinite,
    train_accuracy=st.none() | share,
    test_accuracy=st.none() | share,
    seconds=st.floats(0, 1e5, allow_subnormal=False),
    top_class_share=st.none() | share,
    collapsed=st.none() | st.booleans(),
    diverged=st.booleans(),
)

runs = st.builds(
    RunRecord,
    dataset=st.sampled_from(["fashion-mnist", "cifar10"]),
    method=st.sampled_from(["none", "rr", "dp-sgd"]),
    method_options=json_obj,
    method_details=json_obj,
    model=st.just("cnn"),
    train_size=st.integers(1, 60000),
    test_accuracy=st.none() | share,
    epsilon=st.floats(0, 1e3, allow_subnormal=False) | st.just(math.inf),
    delta=st.none() | st.floats(0, 0.5, allow_subnormal=False),
    ledger=json_obj,
    train_seconds=st.floats(0, 1e5, allow_subnormal=False),
    eval_seconds=st.floats(0, 1e5, allow_subnormal=False),
    session_wall_seconds=st.floats(0, 1e5, allow_subnormal=False),
    resumed_from_epoch=st.integers(0, 100),
    device=st.just("cpu"),
    history=st.lists(epochs, max_size=3).map(tuple),
    diagnostics=json_obj,
    labeldp_version=st.none() | text,
    git_commit=st.none() | text,
    git_dirty=st.none() | st.booleans(),
    machine=st.none() | text,
    hostname=st.none() | text,
    python=st.none() | text,
    torch=st.none() | text,
    date=st.none() | text,
    evaluation_split=st.sampled_from(["test", "validation"]),
    validation_accuracy=st.none() | share,
    numerics=st.none() | json_obj,
    outcome=st.sampled_from(["finished", "diverged", "collapsed"]),
    extra=st.dictionaries(st.sampled_from(["later_key", "other"]), json_leaf),
)

parts = st.none() | st.fixed_dictionaries(
    {
        "epsilon_lb": st.floats(0, 20, allow_subnormal=False) | st.just(math.inf),
        "epsilon_lb_max": st.floats(0, 20, allow_subnormal=False) | st.just(math.inf),
        "epsilon_point": st.none() | maybe_infinite,
        "canaries": st.integers(0, 1000),
        "by_guesses": st.lists(
            st.fixed_dictionaries(
                {
                    "guesses": st.integers(0, 9),
                    "epsilon_lb": st.floats(0, 9, allow_subnormal=False) | st.just(math.inf),
                }
            ),
            max_size=2,
        ),
    }
)

attacks = st.builds(
    AttackRecord,
    run=text,
    method=st.sampled_from(["none", "rr", "dp-sgd"]),
    epsilon=st.floats(0, 1e3, allow_subnormal=False) | st.just(math.inf),
    delta=st.none() | st.floats(0, 0.5, allow_subnormal=False),
    alpha=st.floats(0.001, 0.5, allow_subnormal=False),
    memorization=parts,
    one_run=parts,
    label_inference=st.fixed_dictionaries({"gap": st.floats(-1, 1, allow_subnormal=False)}),
    notes=st.lists(text, max_size=2).map(tuple),
    bound_tested=st.none()
    | st.fixed_dictionaries(
        {
            "relation": st.none() | text,
            "epsilon": st.floats(0, 9, allow_subnormal=False) | st.just(math.inf),
        }
    ),
)

plans = st.builds(
    DPSGDPlan,
    sample_rate=st.floats(1e-6, 1, allow_subnormal=False),
    steps=st.integers(1, 10**6),
    noise_multiplier=st.floats(0.1, 100, allow_subnormal=False),
    epsilon=st.floats(0, 100, allow_subnormal=False),
)


# ------------------------------------------------------------------ round trips


@FAST
@given(epochs)
def test_epoch_records_round_trip_through_strict_json(record):
    assert EpochRecord.from_json(_strict(record.to_json())) == record


@FAST
@given(runs)
def test_run_records_round_trip_through_strict_json(record):
    data = record.to_json()
    assert RunRecord.from_json(_strict(data)) == record
    assert set(data) >= {"epsilon", "delta", "ledger", "history", "diagnostics", "outcome"}


@FAST
@given(attacks)
def test_attack_records_round_trip_through_strict_json(record):
    assert AttackRecord.from_json(_strict(record.to_json())) == record


@FAST
@given(plans)
def test_dpsgd_plans_round_trip_through_strict_json(plan):
    assert DPSGDPlan.from_json(_strict(plan.to_json())) == plan


def test_dpsgd_plan_is_the_typed_record_the_method_uses():
    method = DPSGDMethod(epsilon=4.0, accountant="rdp")
    plan = method.plan(1000, 100, 2)
    assert isinstance(plan, DPSGDPlan) and plan is method.plan(1000, 100, 2)  # computed once
    assert plan.sample_rate == 0.1 and plan.steps == 20 and 0 < plan.epsilon <= 4.0
    assert set(plan.to_json()) == {"sample_rate", "steps", "noise_multiplier", "epsilon"}


# ------------------------------------------------------------------ the ∞ convention


def test_infinity_is_a_string_and_null_only_means_none():
    assert number_to_json(math.inf) == "Infinity" and number_to_json(-math.inf) == "-Infinity"
    assert number_to_json(math.nan) is None and number_to_json(None) is None
    assert number_to_json(1.5) == 1.5 and number_to_json(3) == 3
    for spelled in ("Infinity", "inf"):  # the convention, and older attack.json's
        assert number_from_json(spelled) == math.inf
        assert number_from_json("-" + spelled) == -math.inf
    assert number_from_json(None) is None
    assert number_from_json(None, none=math.inf) == math.inf  # where old files meant ∞
    with pytest.raises(DataError):
        number_from_json("lots")
    assert to_json_value({"a": (math.inf, math.nan, 2.0)}) == {"a": ["Infinity", None, 2.0]}


def test_a_non_private_run_writes_epsilon_infinity_and_reads_it_back():
    record = run_record(epsilon=None, delta=None)
    assert record.epsilon == math.inf and not record.is_private
    data = _strict(record.to_json())
    assert data["epsilon"] == "Infinity" and data["delta"] is None
    assert RunRecord.from_json(data).epsilon == math.inf
    private = run_record(method="rr", epsilon=2.0, delta=0.0)
    assert private.is_private and _strict(private.to_json())["epsilon"] == 2.0


def test_an_infinite_epsilon_lb_is_told_apart_from_one_not_computed():
    part = {"epsilon_lb": math.inf, "epsilon_lb_max": 5.0, "epsilon_point": None}
    record = attack_record(method="rr", epsilon=2.0, memorization=part)
    data = _strict(record.to_json())
    assert data["memorization"]["epsilon_lb"] == "Infinity"  # ∞: every guess certified
    assert data["memorization"]["epsilon_point"] is None  # not computed (no guesses)
    assert data["one_run"] is None  # not run (no audit canaries)
    back = AttackRecord.from_json(data)
    assert back.memorization["epsilon_lb"] == math.inf and back.one_run is None
    assert back.memorization["epsilon_point"] is None


def test_a_diverged_epoch_records_nan_as_null_and_an_infinite_loss_as_infinity():
    nan = EpochRecord(1, 0.1, math.nan, 0.1, 0.1, 1.0, diverged=True).to_json()
    assert nan["train_loss"] is None and nan["diverged"] is True
    inf = EpochRecord(1, 0.1, math.inf, 0.1, 0.1, 1.0).to_json()
    assert inf["train_loss"] == "Infinity" and "diverged" not in inf
    assert EpochRecord.from_json(_strict(inf)).train_loss == math.inf


# ------------------------------------------------------------------ older forms


#: metrics.json as labeldp wrote it before evaluation_split, numerics and outcome (a
#: stored row of results/runs.sqlite, shortened): a non-private run's ε as null.
OLD_METRICS = {
    "dataset": "fashion-mnist",
    "date": "2026-12-02T08:03:17+00:00",
    "delta": None,
    "device": "cpu (2 threads)",
    "diagnostics": {"label_accuracy_of_answers": None},
    "epsilon": None,
    "eval_seconds": 0.5,
    "git_commit": "abc",
    "git_dirty": False,
    "history": [
        {
            "epoch": 1,
            "lr": 0.1,
            "seconds": 2.0,
            "test_accuracy": None,
            "train_accuracy": 0.5,
            "train_loss": None,
        },  # fmt: skip
        {
            "collapsed": False,
            "epoch": 2,
            "lr": 0.0,
            "seconds": 2.0,
            "test_accuracy": 0.8,
            "top_class_share": 0.11,
            "train_accuracy": 0.7,
            "train_loss": 0.6,
        },  # fmt: skip
    ],
    "hostname": "h",
    "labeldp_version": "0.1.0",
    "ledger": {"composition": "basic", "delta": None, "entries": [], "epsilon": None},
    "machine": "x86_64",
    "method": "none",
    "method_details": {},
    "method_options": {},
    "model": "cnn",
    "python": "3.11",
    "resumed_from_epoch": 0,
    "session_wall_seconds": 5.0,
    "test_accuracy": 0.8,
    "torch": "2.5",
    "train_seconds": 4.0,
    "train_size": 8000,
}

#: attack.json before bound_tested was recorded, with ∞ as "inf".
OLD_ATTACK = {
    "alpha": 0.05,
    "delta": None,
    "epsilon": None,
    "label_inference": {"gap": 0.02},
    "memorization": {"epsilon_lb": 2.3, "epsilon_lb_max": 2.9, "epsilon_point": "inf"},
    "method": "none",
    "notes": [],
    "one_run": {
        "epsilon_lb": 1.0,
        "epsilon_point": "-inf",
        "by_guesses": [{"guesses": 4, "correct": 4, "epsilon_lb": 1.0}],
    },
    "run": "runs/x",
}


def test_old_metrics_json_is_read_with_the_defaults_of_later_keys():
    record = RunRecord.from_json(OLD_METRICS)
    assert record.epsilon == math.inf and record.delta is None  # null meant ∞ there
    assert (record.evaluation_split, record.outcome) == ("test", "finished")
    assert record.validation_accuracy is None and record.numerics is None
    assert record.evaluation_accuracy == 0.8 and record.history[1].top_class_share == 0.11
    assert record.history[0].collapsed is None and record.extra == {}
    # written back in today's form, it reads as the same record
    assert RunRecord.from_json(_strict(record.to_json())) == record


def test_old_attack_json_is_read_with_inf_strings_as_infinity():
    record = AttackRecord.from_json(OLD_ATTACK)
    assert record.epsilon == math.inf and record.bound_tested is None
    assert record.memorization["epsilon_point"] == math.inf
    assert record.one_run["epsilon_point"] == -math.inf
    assert record.one_run["by_guesses"][0]["epsilon_lb"] == 1.0
    data = _strict(record.to_json())
    assert data["memorization"]["epsilon_point"] == "Infinity" and "bound_tested" not in data


def test_a_record_lacking_a_key_is_refused_naming_it(tmp_path):
    broken = {k: v for k, v in OLD_METRICS.items() if k != "ledger"}
    with pytest.raises(DataError, match="ledger"):
        RunRecord.from_json(broken)
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps(broken))
    with pytest.raises(DataError, match="not a run record.*train again"):
        read_run_record(path, "train again")


def test_the_store_reads_rows_of_old_and_new_forms_alike(tmp_path):
    path = tmp_path / "runs.sqlite"
    db = sqlite3.connect(path)
    db.executescript(SCHEMA)
    db.execute(
        "INSERT INTO runs (sweep, key, name, method, seed, test_accuracy, eps_lb_memorization, "
        "run_dir, config, metrics, attack, finished_at) "
        "VALUES ('s', 'old', 'n', 'none', 0, 0.8, 2.3, 'r', '{}', ?, ?, 'then')",
        (json.dumps(OLD_METRICS), json.dumps(OLD_ATTACK)),
    )
    db.commit()
    db.close()
    store = ResultsStore(path)
    new_attack = attack_record(
        memorization={"epsilon_lb": math.inf, "epsilon_lb_max": math.inf, "canaries": 4}
    )
    store.record("s", "new", {"method": "none", "train": {"seed": 1}}, "r2",
                 run_record(), new_attack, "now")  # fmt: skip
    old, new = store.rows("s")
    assert store.run_record(old) == RunRecord.from_json(OLD_METRICS)
    assert store.attack_record(old) == AttackRecord.from_json(OLD_ATTACK)
    assert store.run_record(new) == run_record() and store.attack_record(new) == new_attack
    # the new row's JSON is strict and spells ∞ one way; its ε_LB column is SQL's ∞
    assert json.loads(new["metrics"])["epsilon"] == "Infinity"
    assert json.loads(new["attack"])["memorization"]["epsilon_lb"] == "Infinity"
    assert new["eps_lb_memorization"] == math.inf and new["eps_lb_one_run"] is None
    assert store.attack_record({"attack": None}) is None
