"""Random streams: every use of randomness in a run draws from its own named stream.

A seed for a stream is derived from (run seed, stream, index...), where each consumer
names a distinct :class:`Stream`, so no two consumers can ever share a stream (a mechanism's
coins must be independent of, say, the batch order, or the model becomes a function of
the coins themselves rather than only of the noisy labels). The number of parts is mixed
in too, because numpy's SeedSequence would otherwise treat trailing zeros as absent.

Privacy noise (every mechanism's draws, DP-SGD's noise and its Poisson coins, and with
them the batch order of every run) is also keyed by the run's whole configuration
(:func:`config_key`: method, its options — ε, δ, … — and the training options): two runs
that differ in anything, such as only ε, draw independent noise, so releasing both costs
what composition says and no more; a rerun of the same configuration reproduces its noise
exactly. (Without the key, runs at ε = 1 and ε = 2 of one seed drew the same uniforms,
and together gave back the true labels wherever they disagreed.)
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from enum import IntEnum
from typing import Any

import numpy as np


class Stream(IntEnum):
    """Who draws from a stream. Never reuse or renumber a value: seeds would change."""

    TRAIN_SUBSET = 1  # --train-size subset
    MODEL_INIT = 2  # model initialisation
    CANARIES = 3  # canary choice, canary labels, coins
    OUTPUT_SAMPLE = 4  # label-inference sample stored with the run
    ATTACK_SPLIT = 5  # memorization attack's selection/measurement halves
    VALIDATION = 6  # the validation split held out of the training split
    EPOCH_GLOBAL = 10  # torch's global generator, per epoch
    EPOCH_BATCHES = 11  # batch order and augmentation, per epoch
    RR_NOISE = 100
    ALIBI_NOISE = 110
    LPMST_NOISE = 120  # per stage
    LPMST_SPLIT = 121
    DPSGD_NOISE = 130  # per epoch
    FIXMATCH_UNLABELED = 140  # unlabeled draws and their augmentation, per epoch
    ENSEMBLE_STEP = 141  # an ensemble's labeled/unlabeled draws and augmentation, per step
    PATE_PARTITION = 150  # teachers' label parts
    PATE_TEACHERS = 151  # teacher initialisation (per teacher) and training draws
    PATE_QUERIES = 152  # the query pool
    PATE_NOISE = 153  # Confident-GNMax noise
    PATE_RELEASE = 154  # the smooth-sensitivity release of the data-dependent cost
    FL_SCHEDULE = 160  # a federation's timing and client selection (phase A)
    FL_TRIP = 161  # one client trip's local batches and augmentation, per trip
    FL_LABEL_NOISE = 162  # clients' label randomization, per example
    FL_USER_NOISE = 163  # user-level DP noise, per flush
    FL_POPULATION = 164  # how the examples are dealt to the clients
    LABELDP_PRO_PROJECTION = 170  # LabelDP-Pro's projection batches (features only), per epoch


def derive_seed(seed: int, stream: Stream, *index: int, key: Sequence[int] = ()) -> int:
    """A 63-bit seed for ``stream`` of run ``seed`` (e.g. ``index`` = epoch or stage).

    key: words of a run's :func:`config_key`, for privacy noise; distinct keys give
    independent seeds (empty: the seed depends on (seed, stream, index) alone)."""
    parts = [int(seed), int(stream), *(int(i) for i in index)]
    entropy = [*parts, len(parts)]
    if key:  # a marker keeps (index, key) splits apart
        entropy += [*(int(w) for w in key), len(key), 0x6B6579]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> 1)


def config_key(config: dict[str, Any]) -> tuple[int, ...]:
    """Eight 32-bit words of the SHA-256 of a run configuration's canonical JSON: the key
    that makes a run's privacy noise its own (see the module docstring)."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    digest = hashlib.sha256(text.encode()).digest()
    return tuple(int.from_bytes(digest[i : i + 4], "big") for i in range(0, 32, 4))
