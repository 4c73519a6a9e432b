"""Parameters are plain arrays in a named mapping.

A model's parameters are a ``dict[str, array]`` with dotted names such as
``"enc.32x32_block0.conv0.weight"``; gradients are a dict with the same keys
and shapes. Nothing here is a class with hidden state: a student reads the
dict, an optimizer walks it, a checkpoint writes it key by key.

Initialisers follow DDPM++ (Song et al. 2021) as used by NVlabs/edm: weights
drawn uniformly with variance scale / fan_avg ("xavier_uniform"), biases zero,
and output layers zero-initialised where the architecture says so.
"""
from __future__ import annotations

import numpy as np

from . import backend


def count(params) -> int:
    """Total number of scalars in a parameter dict."""
    return int(sum(int(np.prod(p.shape)) for p in params.values()))


def zeros_like(params):
    """A gradient/moment dict of zeros with the same keys, shapes, dtypes."""
    return {k: backend.array_module(v).zeros_like(v) for k, v in params.items()}


def astype(params, dtype):
    return {k: v.astype(dtype) for k, v in params.items()}


def to_device(params, xp):
    return {k: backend.to_device(v, xp) for k, v in params.items()}


def to_numpy(params):
    return {k: backend.to_numpy(v) for k, v in params.items()}


def copy(params):
    return {k: v.copy() for k, v in params.items()}


def xavier_uniform(rng: np.random.Generator, shape, fan_in: int, fan_out: int, scale: float = 1.0):
    """U(-a, a) with a = sqrt(6 scale / (fan_in + fan_out)): variance scale / fan_avg."""
    limit = np.sqrt(6.0 * scale / (fan_in + fan_out))
    return rng.uniform(-limit, limit, size=shape).astype(np.float32)


def conv_weight(rng, c_out: int, c_in: int, k: int, scale: float = 1.0):
    """OIHW conv weight, xavier-uniform over fans c_in*k*k and c_out*k*k."""
    return xavier_uniform(rng, (c_out, c_in, k, k), c_in * k * k, c_out * k * k, scale)


def linear_weight(rng, n_out: int, n_in: int, scale: float = 1.0):
    """(out, in) weight, as torch.nn.Linear stores it."""
    return xavier_uniform(rng, (n_out, n_in), n_in, n_out, scale)


def randomize(params, seed: int = 0, std: float = 0.3):
    """Replace every entry by fresh random values (same dtype/device).

    Gradient checks use this: zero-initialised output layers would otherwise
    block every gradient behind them and the check would pass vacuously.
    """
    rng = np.random.default_rng(seed)
    out = {}
    for k, v in params.items():
        xp = backend.array_module(v)
        if k.endswith(".gamma"):    # norm scales stay near 1 so the net stays well conditioned
            r = 1.0 + std * rng.standard_normal(v.shape)
        else:
            r = std * rng.standard_normal(v.shape)
        out[k] = xp.asarray(r.astype(v.dtype))
    return out


def accumulate(grads: dict, name: str, g):
    """grads[name] += g, creating the entry on first use (shared weights add up)."""
    if name in grads:
        grads[name] = grads[name] + g
    else:
        grads[name] = g


def accumulate_all(grads: dict, sub: dict, prefix: str = ""):
    """Add a sublayer's gradients (local names, e.g. {"weight": .., "bias": ..}) into
    grads under "{prefix}.{name}"; entries already there add up (shared weights)."""
    for name, g in sub.items():
        accumulate(grads, f"{prefix}.{name}" if prefix else name, g)
    return grads
