"""Seeded orderings: the grouped train/validation split and the per-epoch shuffle.

Both draw from ``numpy.random.default_rng`` seeded with ``[seed, stream, ...]``, so the
split does not depend on the epoch and no two epochs share a shuffle. Every process
of a multi-host run computes the same orderings.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

_SPLIT_STREAM = 0
_SHUFFLE_STREAM = 1


def split_by_group(
    groups_N: Sequence[str], validation_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, validation indices) into ``groups_N``, splitting whole groups.

    ``round(validation_fraction * G)`` of the G distinct groups (at least one when the
    fraction is positive, at most G - 1) go to validation, chosen by a seeded permutation
    of the sorted groups; every row of a group lands on the same side.
    """
    unique = sorted(set(groups_N))
    n_val = round(validation_fraction * len(unique))
    if validation_fraction > 0:
        n_val = min(max(n_val, 1), len(unique) - 1)
    chosen = np.random.default_rng([seed, _SPLIT_STREAM]).permutation(len(unique))[:n_val]
    val_groups = {unique[i] for i in chosen}
    is_val_N = np.fromiter((g in val_groups for g in groups_N), bool, len(groups_N))
    return np.flatnonzero(~is_val_N), np.flatnonzero(is_val_N)


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """A permutation of ``range(n)`` fixed by (seed, epoch); int64 [n]."""
    return np.random.default_rng([seed, _SHUFFLE_STREAM, epoch]).permutation(n)
