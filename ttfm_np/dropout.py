"""Inverted dropout: y = x * mask / (1 - p), mask ~ Bernoulli(1 - p).

The mask comes from a random Generator the caller passes in (seeded), so a run
is reproducible and a gradient check can replay the exact same mask.
"""
from __future__ import annotations


def dropout_forward(x, p: float, rng):
    """x: any shape; p in [0, 1); rng: numpy/cupy Generator. Returns (y, cache)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    if p == 0.0:
        return x, None
    keep = rng.random(x.shape, dtype=x.dtype) >= p
    scaled_mask = keep.astype(x.dtype) / (1.0 - p)      # inverted dropout: E[y] = x
    return x * scaled_mask, scaled_mask


def dropout_backward(dy, cache):
    # y = x * scaled_mask  =>  dx = dy * scaled_mask
    return dy if cache is None else dy * cache
