"""Random streams: every use of randomness in a run draws from its own named stream.

A seed for a stream is derived from (run seed, stream, index...), where each consumer
names a distinct :class:`Stream`, so no two consumers can ever share a stream (a mechanism's
coins must be independent of, say, the batch order, or the model becomes a function of
the coins themselves rather than only of the noisy labels). The number of parts is mixed
in too, because numpy's SeedSequence would otherwise treat trailing zeros as absent.
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np


class Stream(IntEnum):
    """Who draws from a stream. Never reuse or renumber a value: seeds would change."""

    TRAIN_SUBSET = 1  # --train-size subset
    MODEL_INIT = 2  # model initialisation
    CANARIES = 3  # canary choice, canary labels, coins
    OUTPUT_SAMPLE = 4  # label-inference sample stored with the run
    ATTACK_SPLIT = 5  # memorization attack's selection/measurement halves
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


def derive_seed(seed: int, stream: Stream, *index: int) -> int:
    """A 63-bit seed for ``stream`` of run ``seed`` (e.g. ``index`` = epoch or stage)."""
    parts = [int(seed), int(stream), *(int(i) for i in index)]
    entropy = [*parts, len(parts)]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> 1)
