"""The records a run leaves: typed, frozen, each with one JSON form.

- :class:`EpochRecord`: one entry of a run's per-epoch history;
- :class:`RunRecord`: what ``metrics.json`` holds (and the store's ``metrics`` column);
- :class:`AttackRecord`: what ``attack.json`` holds (and the store's ``attack`` column).

(DP-SGD's plan, :class:`labeldp.methods.dpsgd.DPSGDPlan`, lives next to its producer.)

Each record has ``to_json()`` (a dict that strict JSON can hold) and ``from_json(dict)``;
``from_json(r.to_json()) == r``. ``from_json`` also reads the forms that earlier versions
wrote (results/runs.sqlite keeps them): keys added since then take the defaults their
fields document, and the old spellings of ∞ below are read as ∞. Keys a record does not
know are kept in its ``extra`` and written back as they were.

Infinity in JSON
----------------
This is the one convention for every JSON file labeldp writes (metrics.json,
attack.json, the store's JSON columns; the reports read through these records).

JSON has no infinity (Python's ``Infinity`` is not JSON, and labeldp writes strict JSON).
A number that can be infinite is a JSON number when finite and the string ``"Infinity"``
(``"-Infinity"``) when it is +∞ (−∞): the spelling of the protobuf JSON mapping and of
JavaScript's ``Number()``; Python's ``float()`` reads it. ``null`` never means ∞: it means
"none" — not computed, not applicable, or not a number (NaN, e.g. the loss of a diverged
epoch). So:

- a non-private run's ε is ∞: ``"epsilon": "Infinity"`` (in metrics.json, its ledger,
  attack.json and attack.json's ``bound_tested``), its δ ``null`` (no guarantee, no δ);
- an ε_LB or an ε point estimate of ±∞ is ``"Infinity"`` / ``"-Infinity"``, and an ε
  point estimate that was not computed (no guesses) is ``null``.

In memory every such value is a float (``math.inf``), never None or a string.

Older files wrote ∞ otherwise, and are still read: metrics.json wrote a non-private run's
ε (top level and ledger) and every other non-finite number as ``null``; attack.json wrote
the run's ε and ``bound_tested.epsilon`` as ``null`` and ∞ in attack results as the string
``"inf"`` (``"-inf"``). :func:`number_from_json` reads ``"inf"`` too, and the records read
``null`` as ∞ exactly where the old files meant ∞ by it (a run's claimed ε).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from .errors import DataError

#: How +∞ and −∞ are written in JSON (see the module docstring).
INFINITY, MINUS_INFINITY = "Infinity", "-Infinity"
_INFINITE = {INFINITY: math.inf, MINUS_INFINITY: -math.inf, "inf": math.inf, "-inf": -math.inf}


def number_to_json(x: float | None) -> float | str | None:
    """``x`` in its JSON form: finite numbers as they are, ±∞ as "Infinity"/"-Infinity",
    NaN and None as None."""
    if x is None or isinstance(x, bool) or not isinstance(x, float):
        return x
    if math.isnan(x):
        return None
    if math.isinf(x):
        return INFINITY if x > 0 else MINUS_INFINITY
    return x


def number_from_json(x: Any, none: float | None = None) -> float | None:
    """A JSON number, "Infinity"/"-Infinity" (or the older "inf"/"-inf") as a float (ints
    stay ints); None as ``none`` (math.inf where an old file meant ∞ by null)."""
    if x is None:
        return none
    if isinstance(x, str):
        try:
            return _INFINITE[x]
        except KeyError:
            raise DataError(f"not a number or an infinity: {x!r}") from None
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise DataError(f"not a number: {x!r}")
    return x


def to_json_value(obj: Any) -> Any:
    """``obj`` with every float in its dicts, lists and tuples in its JSON form
    (:func:`number_to_json`), tuples as lists, records as their ``to_json()``: what strict
    JSON (``allow_nan=False``) can hold."""
    if isinstance(obj, float):
        return number_to_json(obj)
    if hasattr(obj, "to_json"):
        return obj.to_json()
    if isinstance(obj, Mapping):
        return {key: to_json_value(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_json_value(value) for value in obj]
    return obj


def _require(data: Mapping[str, Any], what: str, keys: tuple[str, ...]) -> None:
    if not isinstance(data, Mapping):
        raise DataError(f"{what} must be a JSON object, got {type(data).__name__}")
    missing = [k for k in keys if k not in data]
    if missing:
        raise DataError(f"{what} lacks {', '.join(missing)}")


def _extra(cls: type, data: Mapping[str, Any]) -> dict[str, Any]:
    known = {f.name for f in fields(cls)} - {"extra"}
    return {k: v for k, v in data.items() if k not in known}


@dataclass(frozen=True)
class EpochRecord:
    """One finished epoch of a training run (one entry of ``metrics.json["history"]``).

    epoch: its number, 1-based. lr: the learning rate of its last step.
    train_loss: the mean training loss against the training targets, None when the
        gradient step withholds it (DP-SGD: a statistic of the raw data) or it was not a
        number (a diverged epoch); may be ±∞.
    train_accuracy: accuracy (0–1) against the training targets, None when withheld.
    test_accuracy: accuracy (0–1) on the evaluation split (the test split, or the
        validation split of a tuning run), None when the epoch was not evaluated.
    seconds: wall-clock seconds of its training steps.
    top_class_share: in an evaluated epoch, the share (0–1) of evaluation predictions
        that go to the most-predicted class; None (and absent from the JSON) otherwise.
    collapsed: in an evaluated epoch, whether the model sits on the constant-prediction
        plateau (labeldp.train.loop.collapsed); None (absent) otherwise.
    diverged: training stopped in this epoch because the loss or the weights became
        non-finite (present in the JSON only when True).
    """

    epoch: int
    lr: float
    train_loss: float | None
    train_accuracy: float | None
    test_accuracy: float | None
    seconds: float
    top_class_share: float | None = None
    collapsed: bool | None = None
    diverged: bool = False
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "epoch": self.epoch,
            "lr": self.lr,
            "train_loss": self.train_loss,
            "train_accuracy": self.train_accuracy,
            "test_accuracy": self.test_accuracy,
            "seconds": self.seconds,
        }
        if self.top_class_share is not None:
            out["top_class_share"] = self.top_class_share
        if self.collapsed is not None:
            out["collapsed"] = self.collapsed
        if self.diverged:
            out["diverged"] = True
        return to_json_value({**out, **self.extra})

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> EpochRecord:
        _require(data, "a history entry", ("epoch", "lr", "seconds"))
        return cls(
            epoch=data["epoch"],
            lr=number_from_json(data["lr"]),
            train_loss=number_from_json(data.get("train_loss")),
            train_accuracy=data.get("train_accuracy"),
            test_accuracy=data.get("test_accuracy"),
            seconds=number_from_json(data["seconds"]),
            top_class_share=data.get("top_class_share"),
            collapsed=data.get("collapsed"),
            diverged=bool(data.get("diverged", False)),
            extra=_extra(cls, data),
        )


#: The provenance keys of metrics.json (labeldp.provenance.provenance).
PROVENANCE_KEYS = (
    "labeldp_version",
    "git_commit",
    "git_dirty",
    "machine",
    "hostname",
    "python",
    "torch",
    "date",
)


@dataclass(frozen=True)
class RunRecord:
    """What one finished run records: the content of its ``metrics.json``.

    dataset, method, model: the names the run used; method_options: the method's
        hyper-parameters (every option, defaults included); method_details: what the
        method reports about its run (covered by the guarantee: post-processing).
    train_size: training examples (canaries included).
    evaluation_split: "test", or "validation" for a tuning run (``validation_size``).
    test_accuracy: accuracy (0–1) of the released model on the test split; None when the
        run was evaluated on the validation split. validation_accuracy: likewise (0–1) on
        the validation split, None otherwise.
    epsilon: the run's ε for its ledger's relation (per label for the label-DP methods,
        per example for dp-sgd: see ``ledger["relation"]``); ``math.inf`` for a
        non-private run. delta: its δ in [0, 1), None for a non-private run.
    ledger: the privacy ledger in its JSON form (labeldp.privacy.ledger.PrivacyLedger
        .to_dict), kept as written.
    train_seconds, eval_seconds: wall-clock seconds spent training / evaluating, over all
        sessions of a resumed run; session_wall_seconds: seconds of the last session,
        end to end. resumed_from_epoch: the epoch the last session resumed from (0: none).
    device: where it ran, in words; numerics: the numerics settings
        (labeldp.provenance.numerics), None for runs made before they were recorded.
    history: the final model's per-epoch history.
    diagnostics: statistics computed against the true labels and raw data, outside the
        guarantee (see labeldp.run_folder): never publish them with the run.
    outcome: "finished", "diverged" (training stopped on non-finite numbers) or
        "collapsed" (the constant-prediction plateau); runs made before it was recorded
        read "finished".
    labeldp_version ... date: provenance (labeldp.provenance.provenance); date is when
        the run finished (ISO 8601, UTC).
    extra: keys of the JSON this record does not know, kept as they were.

    Runs recorded before ``evaluation_split``, ``validation_accuracy``, ``numerics`` and
    ``outcome`` existed read "test", None, None and "finished".
    """

    dataset: str
    method: str
    method_options: Mapping[str, Any]
    method_details: Mapping[str, Any]
    model: str
    train_size: int
    test_accuracy: float | None
    epsilon: float
    delta: float | None
    ledger: Mapping[str, Any]
    train_seconds: float
    eval_seconds: float
    session_wall_seconds: float
    resumed_from_epoch: int
    device: str
    history: tuple[EpochRecord, ...]
    diagnostics: Mapping[str, Any]
    labeldp_version: str | None
    git_commit: str | None
    git_dirty: bool | None
    machine: str | None
    hostname: str | None
    python: str | None
    torch: str | None
    date: str | None
    evaluation_split: str = "test"
    validation_accuracy: float | None = None
    numerics: Mapping[str, Any] | None = None
    outcome: str = "finished"
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def is_private(self) -> bool:
        """Whether the run claims a finite ε."""
        return not math.isinf(self.epsilon)

    @property
    def evaluation_accuracy(self) -> float:
        """Accuracy (0–1) on the evaluation split: the validation accuracy of a tuning
        run, else the test accuracy (the store's ``test_accuracy`` column holds this)."""
        if self.evaluation_split == "validation":
            return self.validation_accuracy
        return self.test_accuracy

    def to_json(self) -> dict[str, Any]:
        """metrics.json's content: every field under its name (history as a list of
        entries, ∞ as "Infinity"), then ``extra``."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        out["history"] = [e.to_json() for e in self.history]
        return to_json_value({**out, **self.extra})

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RunRecord:
        """The record of a metrics.json dict, of this version or an earlier one."""
        required = tuple(
            f.name
            for f in fields(cls)
            if f.name
            not in (
                "extra",
                "evaluation_split",
                "validation_accuracy",
                "numerics",
                "outcome",
            )  # fmt: skip
        )
        _require(data, "a run record (metrics.json)", required)
        values = {name: data[name] for name in required}
        # a run's ε is always defined: null (older files) meant ∞, no privacy claimed
        values["epsilon"] = float(number_from_json(data["epsilon"], none=math.inf))
        values["delta"] = number_from_json(data["delta"])
        values["history"] = tuple(EpochRecord.from_json(e) for e in data["history"])
        return cls(
            **values,
            evaluation_split=data.get("evaluation_split", "test"),
            validation_accuracy=data.get("validation_accuracy"),
            numerics=data.get("numerics"),
            outcome=data.get("outcome", "finished"),
            extra=_extra(cls, data),
        )


#: The keys of an attack result (attack.json's ``memorization`` and ``one_run``, and
#: the one-run audit's ``by_guesses`` rows) whose values may be infinite.
_ATTACK_NUMBERS = ("epsilon_lb", "epsilon_lb_max", "epsilon_point")


def _attack_part(part: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """An attack result with its ε values as floats (old "inf" strings read as ∞)."""
    if part is None:
        return None
    out = dict(part)
    for key in _ATTACK_NUMBERS:
        if key in out:
            out[key] = number_from_json(out[key])
    if isinstance(out.get("by_guesses"), list):
        out["by_guesses"] = [_attack_part(row) for row in out["by_guesses"]]
    return out


@dataclass(frozen=True)
class AttackRecord:
    """What the attacks found in one finished run: the content of its ``attack.json``
    (attacks.harness.attack_run).

    run: the run folder. method: the run's method.
    epsilon, delta: the run's claimed ε (``math.inf`` for a non-private run) and δ (None
        then), as in its metrics.json.
    bound_tested: the (ε, δ) a label-change canary attack is held to (attacks.harness
        .bound_tested: ``relation``, ``epsilon`` — ``math.inf`` when no privacy is
        claimed —, ``delta``, ``from``); None in attack.json made before it was recorded.
    alpha: the significance level of every ε_LB (0 < α < 1).
    memorization, one_run: each audit's result (attacks.memorization /
        attacks.one_run: ``epsilon_lb`` ≥ 0, its cap ``epsilon_lb_max``, the point
        estimate ``epsilon_point`` (±∞ possible, None without guesses), counts, and
        ``exceeds_bound`` / ``can_fail`` where a bound was tested); None without the
        canaries it needs. ε values are floats, ∞ as ``math.inf``.
    label_inference: attacks.label_inference's result (accuracies 0–1, their ``gap``).
    notes: sentences about the result (violations, audits that cannot fail).
    extra: keys of the JSON this record does not know, kept as they were.
    """

    run: str
    method: str
    epsilon: float
    delta: float | None
    alpha: float
    memorization: Mapping[str, Any] | None
    one_run: Mapping[str, Any] | None
    label_inference: Mapping[str, Any]
    notes: tuple[str, ...] = ()
    bound_tested: Mapping[str, Any] | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def part(self, name: str) -> Mapping[str, Any] | None:
        """The result of the audit ``name`` ("memorization" or "one_run")."""
        if name not in ("memorization", "one_run"):
            raise ValueError(f"no audit named {name!r}")
        return getattr(self, name)

    def to_json(self) -> dict[str, Any]:
        """attack.json's content (∞ as "Infinity")."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        if self.bound_tested is None:
            del out["bound_tested"]
        return to_json_value({**out, **self.extra})

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> AttackRecord:
        """The record of an attack.json dict, of this version or an earlier one."""
        _require(
            data,
            "an attack record (attack.json)",
            (
                "run",
                "method",
                "epsilon",
                "delta",
                "alpha",
                "memorization",
                "one_run",
                "label_inference",
            ),  # fmt: skip
        )
        tested = data.get("bound_tested")
        if tested is not None:
            tested = {**tested, "epsilon": number_from_json(tested.get("epsilon"), none=math.inf)}
        return cls(
            run=data["run"],
            method=data["method"],
            epsilon=float(number_from_json(data["epsilon"], none=math.inf)),
            delta=number_from_json(data["delta"]),
            alpha=data["alpha"],
            memorization=_attack_part(data["memorization"]),
            one_run=_attack_part(data["one_run"]),
            label_inference=dict(data["label_inference"]),
            notes=tuple(data.get("notes") or ()),
            bound_tested=tested,
            extra=_extra(cls, data),
        )


__all__ = [
    "INFINITY",
    "MINUS_INFINITY",
    "AttackRecord",
    "EpochRecord",
    "RunRecord",
    "number_from_json",
    "number_to_json",
    "to_json_value",
]
