"""The project's one seed scheme: every random stream is a pure function of
the user's seed and a path of keys, so nothing random needs state to resume.

    derive(seed, "step", 1200, 0)     # noise/times of training step 1200
    derive(seed, "sample", batch_i)   # the noise of the i-th sampling batch

Keys are ints or strings (strings enter through a CRC-32, which is stable
across runs and machines, unlike Python's hash()). numpy's SeedSequence mixes
them into a 63-bit integer seed, used for numpy Generators and for the
counter-based dropout masks alike.
"""
from __future__ import annotations

import zlib

import numpy as np


def _key(k) -> int:
    if isinstance(k, str):
        return zlib.crc32(k.encode("utf-8"))
    k = int(k)
    if k < 0:
        raise ValueError(f"seed keys must be >= 0, got {k}")
    return k


def derive(seed: int, *keys) -> int:
    """A 63-bit seed for (seed, *keys); different key paths give independent streams."""
    entropy = [_key(seed)] + [_key(k) for k in keys]
    return int(np.random.SeedSequence(entropy).generate_state(2, np.uint64)[0] >> np.uint64(1))


def generator(seed: int, *keys) -> np.random.Generator:
    """A host numpy Generator for (seed, *keys)."""
    return np.random.default_rng(derive(seed, *keys))
