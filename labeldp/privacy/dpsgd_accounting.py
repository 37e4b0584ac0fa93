"""Privacy accounting of DP-SGD through dp-accounting: ε for given noise, noise for given ε.

DP-SGD (Abadi et al. 2016) as run by :class:`labeldp.train.dpsgd.DPSGDStep` is the
``steps``-fold composition of one Poisson-subsampled Gaussian mechanism: every example
enters each step's batch independently with probability ``sample_rate`` q, the sum of the
clipped per-example gradients (L2 sensitivity C) gets Gaussian noise of standard deviation
σ·C, where σ is the *noise multiplier* (dimensionless, per step, relative to C).

The neighbouring relation is add/remove one example (the DP-SGD convention, and the
relation of Opacus and of the reference numbers). It protects features and labels alike.
Changing one *label* is a replacement, which group privacy bounds by (2ε, (1 + e^ε)·δ);
:func:`replace_one_bound` gives that bound and the ledger records it beside ε.

Accountants: "pld" (privacy loss distributions, the default: tight up to discretization)
or "rdp" (Rényi DP, a few per cent to ~15 % looser in ε). Both are dp-accounting's, through
:class:`~labeldp.privacy.accountant.Accountant` (relation "add or remove one example");
this module only builds the event, validates arguments, keeps the PLD grid bounded
(:func:`pld_discretization`) and calibrates.
"""

from __future__ import annotations

import math
import warnings

import dp_accounting
import numpy as np

from ..errors import ConfigError
from .accountant import KINDS, PLD_DISCRETIZATION, Accountant
from .neighbouring import Neighbouring

ACCOUNTANTS = KINDS

#: DP-SGD's neighbouring relation.
RELATION = Neighbouring.ADD_REMOVE_ONE_EXAMPLE
#: Most points a PLD grid may have (2^22: ~32 MiB per array, a few seconds at most). A
#: setting whose grid at PLD_DISCRETIZATION would be larger (a huge step count, a tiny
#: noise multiplier) is accounted on a coarser grid instead; see :func:`dpsgd_epsilon`.
PLD_MAX_POINTS = 2**22
#: Most points of one step's PLD, which dp-accounting builds point by point in Python
#: (~5-10 µs a point): 2^17 keeps one evaluation to about a second, so a calibration (about
#: ten evaluations) stays within seconds. A coarser step grid is still pessimistic; at
#: ε = 50 or 1000 over a few steps it changes ε by < 1e-5 against 2^19 points.
PLD_MAX_STEP_POINTS = 2**17
#: Coarsest PLD discretization (nats) worth computing; a setting that needs a coarser one
#: (ε in the tens of thousands) is accounted by RDP alone.
PLD_MAX_DISCRETIZATION = 0.1
#: The smallest noise multiplier accounted (and considered by calibration): below it ε is
#: astronomically large and the accountants' arithmetic overflows.
MIN_NOISE_MULTIPLIER = 0.01


def _check(noise_multiplier: float | None, sample_rate: float, steps: int, delta: float) -> None:
    if noise_multiplier is not None and not (
        math.isfinite(noise_multiplier) and noise_multiplier > 0
    ):
        raise ConfigError(f"noise_multiplier must be a finite number > 0, got {noise_multiplier}")
    if noise_multiplier is not None and noise_multiplier < MIN_NOISE_MULTIPLIER:
        raise ConfigError(
            f"noise_multiplier must be ≥ {MIN_NOISE_MULTIPLIER:g} (below it ε is astronomically "
            f"large and cannot be accounted), got {noise_multiplier:g}"
        )
    if not 0 < sample_rate <= 1:
        raise ConfigError(f"sample_rate must be in (0, 1], got {sample_rate}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps must be an integer ≥ 1, got {steps!r}")
    if not 0 < delta < 1:
        raise ConfigError(f"delta must be in (0, 1), got {delta}")


#: The relations DP-SGD's event may be accounted under: add/remove one example (DP-SGD), or
#: replace one label (LabelDP-Pro: the same noisy clipped sum, but neighbouring datasets
#: differ in one example's label, so its clipped gradient moves anywhere in the ball of
#: radius C: the output's mean moves by up to 2C, dp-accounting's REPLACE_ONE reading).
RELATIONS = (Neighbouring.ADD_REMOVE_ONE_EXAMPLE, Neighbouring.REPLACE_ONE_LABEL)


def _accountant(
    accountant: str, discretization: float = PLD_DISCRETIZATION, relation: Neighbouring = RELATION
) -> Accountant:
    """An empty accountant of ``relation`` (ConfigError for an unknown kind; the
    Accountant itself refuses RDP for the Gaussian under "replace one label")."""
    if relation not in RELATIONS:
        raise ConfigError(
            f"relation must be one of {', '.join(repr(r.value) for r in RELATIONS)}, "
            f"got {relation!r}"
        )
    return Accountant(relation, accountant, discretization)


def pld_discretization(
    noise_multiplier: float, sample_rate: float, steps: int, relation: Neighbouring = RELATION
) -> float:
    """The PLD discretization interval (nats) :func:`dpsgd_epsilon` uses: PLD_DISCRETIZATION,
    or a coarser one where that grid would exceed PLD_MAX_POINTS points (one step's grid,
    PLD_MAX_STEP_POINTS); ``math.inf`` where it would have to be coarser than
    PLD_MAX_DISCRETIZATION (then RDP alone is used).

    The grid spans the privacy losses of one step (between the noise's truncation points,
    mass e^-50) and, composed ``steps`` times, the range dp-accounting keeps after its
    Chernoff truncation; both widths in nats hardly depend on the interval, so they are
    measured on a cheap coarse grid (4,000 points) and the interval is chosen to fit."""
    from dp_accounting.pld import common
    from dp_accounting.pld import privacy_loss_distribution as pld_lib
    from dp_accounting.pld import privacy_loss_mechanism as mechanism

    if sample_rate == 1:  # dp-accounting folds T unsampled steps into one Gaussian
        sigma, count = noise_multiplier / math.sqrt(steps), 1
    else:
        sigma, count = noise_multiplier, steps
    replace = relation is Neighbouring.REPLACE_ONE_LABEL
    adjacencies = (
        (mechanism.AdjacencyType.REPLACE,)
        if replace
        else (mechanism.AdjacencyType.REMOVE, mechanism.AdjacencyType.ADD)
    )
    widths = []
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        for adjacency in adjacencies:
            bounds = mechanism.GaussianPrivacyLoss(
                sigma, sampling_prob=sample_rate, adjacency_type=adjacency
            ).connect_dots_bounds()
            widths.append(bounds.epsilon_upper - bounds.epsilon_lower)
        width = step_width = max(widths)
        if not math.isfinite(width) or width / PLD_MAX_STEP_POINTS > PLD_MAX_DISCRETIZATION:
            return math.inf
        if count > 1 and width / PLD_DISCRETIZATION * count > PLD_MAX_POINTS / 2:
            probe = width / 4000
            try:  # dp-accounting's own truncation of the composition, on the coarse grid
                pld = pld_lib.from_gaussian_mechanism(
                    sigma, value_discretization_interval=probe, sampling_prob=sample_rate,
                    neighboring_relation=relation.dp_accounting_relation,
                )
                for pmf in (pld._pmf_remove, pld._pmf_add):
                    probs = pmf.to_dense_pmf()._probs
                    low, high = common.compute_self_convolve_bounds(probs, count, 1e-15)
                    width = max(width, (high - low + 1) * probe)
            except AttributeError:  # another dp-accounting layout: no truncation assumed
                width *= count
    # 1.5: the coarse grid underestimates the fine grid's composed width by up to ~30 %.
    interval = max(
        PLD_DISCRETIZATION, step_width / PLD_MAX_STEP_POINTS, 1.5 * width / PLD_MAX_POINTS
    )
    if count > 10**5 and min(widths) / interval < 1500:
        # dp-accounting keeps a step PLD of ≤ 1000 points sparse, and composing a sparse
        # one T times first computes points**T as a Python integer (0.9 s for 1000**1e6,
        # hours for larger T). A grid that makes the step dense avoids that.
        interval = min(widths) / 1500
        if 1.5 * width / interval > PLD_MAX_POINTS:
            return math.inf
    return interval if interval <= PLD_MAX_DISCRETIZATION else math.inf


def dpsgd_event(noise_multiplier: float, sample_rate: float, steps: int) -> dp_accounting.DpEvent:
    """The DpEvent of DP-SGD: ``steps`` compositions of the Gaussian mechanism with noise
    multiplier σ, each on a Poisson sample of rate q (q = 1: no sampling)."""
    gaussian = dp_accounting.GaussianDpEvent(noise_multiplier)
    step = (
        gaussian if sample_rate == 1 else dp_accounting.PoissonSampledDpEvent(sample_rate, gaussian)
    )
    return dp_accounting.SelfComposedDpEvent(step, steps)


def dpsgd_epsilon(
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    accountant: str = "pld",
    relation: Neighbouring = RELATION,
) -> float:
    """ε of DP-SGD's event after ``steps`` steps, under ``relation``: add/remove one
    example (DP-SGD, the default) or replace one label (LabelDP-Pro; PLD only).

    noise_multiplier: σ ≥ MIN_NOISE_MULTIPLIER (0.01), noise standard deviation per step
        divided by the clipping norm C. sample_rate: q in (0, 1], the Poisson sampling
        probability per example and step (expected batch size / N). steps: T ≥ 1
        optimizer steps. delta: δ in (0, 1). accountant: "pld" (default) or "rdp".

    Memory and time are bounded whatever the arguments: where the PLD grid at
    PLD_DISCRETIZATION would exceed PLD_MAX_POINTS (huge T, tiny σ), "pld" composes on a
    coarser grid (still pessimistic, so still an upper bound on ε) and returns the smaller
    of that and RDP's ε; where even PLD_MAX_DISCRETIZATION would not fit, RDP's ε.
    """
    _check(noise_multiplier, sample_rate, steps, delta)
    acc = _accountant(accountant, relation=relation)
    replace = relation is Neighbouring.REPLACE_ONE_LABEL
    interval = PLD_DISCRETIZATION
    if accountant == "pld":
        interval = pld_discretization(noise_multiplier, sample_rate, steps, relation)
        if math.isfinite(interval):
            acc = _accountant("pld", interval, relation)
        elif replace:  # no RDP fallback under this relation: ε is astronomically large
            return math.inf
        else:  # a grid too coarse to be worth it: ε is enormous, RDP bounds it
            acc = _accountant("rdp")
    event = dpsgd_event(noise_multiplier, sample_rate, steps)
    epsilon = acc.compose(event).epsilon(delta)
    if interval != PLD_DISCRETIZATION and math.isfinite(interval) and not replace:
        # A coarse (pessimistic) PLD is still an upper bound, but a loose one; so is
        # RDP's, and the smaller of two upper bounds is one too.
        epsilon = min(epsilon, _accountant("rdp").compose(event).epsilon(delta))
    return epsilon


class _AboveFloor(ConfigError):
    """The target ε is met even at MIN_NOISE_MULTIPLIER."""

    @classmethod
    def at(cls, target: float, epsilon: float, steps: int, sample_rate: float) -> _AboveFloor:
        return cls(
            f"target ε = {target:g} is more than DP-SGD's ε even at the smallest noise "
            f"multiplier accounted ({MIN_NOISE_MULTIPLIER:g}: ε = {epsilon:.6g} over {steps} "
            f"steps at sample rate {sample_rate:g}); ask for ε ≤ {epsilon:.6g}, or give the "
            "noise multiplier instead of a target"
        )


def calibrate_dpsgd_noise(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "pld",
    rel_tol: float = 1e-3,
    relation: Neighbouring = RELATION,
) -> float:
    """The smallest noise multiplier σ (to within ``rel_tol`` in ε) whose DP-SGD ε is at
    most ``target_epsilon``: the result's ε lies in [(1 − rel_tol)·target, target].

    target_epsilon: ε > 0 under ``relation`` (add/remove one example by default). Other
    arguments as in :func:`dpsgd_epsilon`. False position on σ (ε is decreasing in σ), over σ ≥
    MIN_NOISE_MULTIPLIER; each evaluation is bounded as in :func:`dpsgd_epsilon`. A target
    that no σ in range meets within that promise is a ConfigError saying what to change.
    """
    _check(None, sample_rate, steps, delta)
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise ConfigError(f"target_epsilon must be a finite number > 0, got {target_epsilon}")
    if not 0 < rel_tol < 1:
        raise ConfigError(f"rel_tol must be in (0, 1), got {rel_tol}")
    floor = MIN_NOISE_MULTIPLIER

    def eps(sigma: float) -> float:
        return dpsgd_epsilon(sigma, sample_rate, steps, delta, accountant, relation)

    # A bracket low < high with eps(high) ≤ target < eps(low). For PLD, the RDP
    # calibration is a cheap upper end (RDP's ε is hardly ever below PLD's); there is none
    # under "replace one label", where the doubling below finds it.
    if accountant == "pld" and relation is RELATION:
        try:
            high = calibrate_dpsgd_noise(target_epsilon, delta, sample_rate, steps, "rdp", rel_tol)
        except _AboveFloor:  # then PLD's ε at the floor is below the target too
            raise _AboveFloor.at(target_epsilon, eps(floor), steps, sample_rate) from None
    else:
        _accountant(accountant, relation=relation)
        high = 1.0
        while eps(high) > target_epsilon:
            high *= 2
            if high > 1e6:
                raise ConfigError(
                    f"no noise multiplier ≤ 1e6 reaches ε = {target_epsilon} at δ = {delta}; "
                    "raise target_epsilon or delta"
                )
    e_high = eps(high)
    while e_high > target_epsilon:
        high *= 1.25
        if high > 1e6:
            raise ConfigError(
                f"no noise multiplier ≤ 1e6 reaches ε = {target_epsilon} at δ = {delta}; "
                "raise target_epsilon or delta"
            )
        e_high = eps(high)
    low, factor = high, 1.25
    while True:
        low = max(low / factor, floor)
        factor *= factor  # PLD's σ can be several times below RDP's for tiny σ
        e_low = eps(low)
        if e_low > target_epsilon:
            break
        if low == floor:
            raise _AboveFloor.at(target_epsilon, e_low, steps, sample_rate)
        high, e_high = low, e_low
    # Illinois false position on ε(σ) − target; f_low / f_high are the interpolation
    # values (halved on a stuck side), e_high the true ε at ``high`` that decides when to stop.
    f_low, f_high = e_low, e_high
    side = 0
    for _ in range(200):
        if e_high >= (1 - rel_tol) * target_epsilon or high - low <= 1e-9 * high:
            break
        mid = high - (f_high - target_epsilon) * (high - low) / (f_high - f_low)
        mid = min(max(mid, low + 1e-3 * (high - low)), high - 1e-3 * (high - low))
        e_mid = eps(mid)
        if e_mid > target_epsilon:
            low, e_low, f_low = mid, e_mid, e_mid
            if side == -1:
                f_high = target_epsilon + (f_high - target_epsilon) / 2
            side = -1
        else:
            high, e_high, f_high = mid, e_mid, e_mid
            if side == 1:
                f_low = target_epsilon + (f_low - target_epsilon) / 2
            side = 1
    if not (1 - rel_tol) * target_epsilon <= e_high <= target_epsilon:
        raise ConfigError(
            f"cannot calibrate the noise multiplier to ε within {rel_tol:g} of "
            f"{target_epsilon:g}: at σ ≈ {high:.6g} the accountant's ε jumps from "
            f"{e_low:.3g} to {e_high:.3g} (its resolution), no σ gives an ε in between; ask "
            f"for ε ≥ {_round_up(e_low)}, or give the noise multiplier instead of a target"
        )
    return high


def _round_up(value: float) -> str:
    """``value`` rounded up to two significant digits, for messages."""
    if not (math.isfinite(value) and value > 0):
        return f"{value:g}"
    scale = 10 ** (math.floor(math.log10(value)) - 1)
    return f"{float(f'{math.ceil(value / scale * (1 - 1e-12)) * scale:.2g}'):g}"


def replace_one_bound(epsilon: float, delta: float) -> tuple[float, float]:
    """(ε′, δ′) for replacing one example (e.g. changing one label) implied by an
    (ε, δ) add/remove guarantee through group privacy of size 2: (2ε, (1 + e^ε)·δ).
    δ′ is capped at 1 (a vacuous bound, e.g. for ε ≳ 12 at δ = 1e-5; e^ε overflows a float
    beyond ε ≈ 709)."""
    if epsilon >= 700 or (1 + math.exp(epsilon)) * delta >= 1:
        return 2 * epsilon, 1.0
    return 2 * epsilon, (1 + math.exp(epsilon)) * delta
