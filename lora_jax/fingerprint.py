"""Fingerprints of base weights: is this adapter being put on the base it was trained on?

Shapes and dtypes tell architectures apart; to tell two checkpoints of one
architecture apart, a SHA-256 covers a fixed sample of each weight's values
(`SAMPLES` evenly spaced elements), which costs little even for large models.
"""

from __future__ import annotations

import hashlib

import numpy as np

SAMPLES = 64


def picks(size: int) -> np.ndarray:
    """Flat indices of the sampled values of an array of `size` elements."""
    return np.linspace(0, size - 1, min(size, SAMPLES)).astype(int)


def update(digest: hashlib._Hash, name: str, array) -> None:
    """Feeds `name` and `SAMPLES` evenly spaced values of `array` (as float32) into `digest`.

    `array` may also be those values already picked (``flat[picks(size)]``): picking from
    at most `SAMPLES` values takes them all.
    """
    values_N = np.asarray(array).reshape(-1)
    digest.update(name.encode())
    digest.update(values_N[picks(values_N.size)].astype(np.float32).tobytes())


def sha256(named_arrays) -> str:
    """Hex SHA-256 over ``(name, array)`` pairs, in the order given."""
    digest = hashlib.sha256()
    for name, array in named_arrays:
        update(digest, name, array)
    return digest.hexdigest()
