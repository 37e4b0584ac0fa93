"""Random streams never collide across consumers, epochs or stages."""

from labeldp.seeding import Stream, derive_seed


def test_streams_are_distinct_across_consumers_and_indices():
    seeds = set()
    for stream in Stream:
        for index in range(0, 300):
            seeds.add(derive_seed(0, stream, index))
        seeds.add(derive_seed(0, stream))
    assert len(seeds) == len(Stream) * 301


def test_trailing_zeros_and_lengths_do_not_collide():
    assert derive_seed(5, Stream.LPMST_SPLIT) != derive_seed(5, Stream.LPMST_SPLIT, 0)
    assert derive_seed(5, Stream.EPOCH_GLOBAL, 0) != derive_seed(5, Stream.EPOCH_GLOBAL, 0, 0)
    # The stage-2 noise of LP-MST is not the batch stream of any epoch.
    epochs = {derive_seed(1, Stream.EPOCH_BATCHES, e) for e in range(1000)}
    assert derive_seed(1, Stream.LPMST_NOISE, 2) not in epochs
