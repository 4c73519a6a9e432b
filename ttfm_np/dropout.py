"""Counter-based inverted dropout: y = x * keep / (1 - p).

The keep mask is a pure function of (dropout_seed, site, element index), not
the next draws of a random Generator:

    key     = splitmix64(splitmix64(dropout_seed) XOR site)       one stream per (seed, site)
    z[i]    = splitmix64(key + (first + i + 1) * GOLDEN)          i = flat (C-order) index into x
    u[i]    = (z[i] >> 11) * 2^-53                                uniform in [0, 1), 53 bits
    keep[i] = u[i] >= p

splitmix64(z) is Vigna's SplitMix64 finaliser (below); z[i] is the i-th output
of a SplitMix64 generator started at `key`. Every evaluation that is given the
same dropout_seed therefore drops the same units (LFMD's finite difference in t
compares two evaluations of one network, so both must use one mask), the
backward recomputes the mask instead of storing it, and the CUDA kernel
(kernels/dropout.cu) computes the same 64-bit integers, so a GPU run replays a
CPU run mask for mask. u and p are compared in double precision on both sides,
so the mask does not depend on x's dtype either.

site identifies one dropout layer inside a network: `site_id(prefix)`, the
CRC-32 of the block's parameter prefix (e.g. "enc.16x16_block0"), stable across
runs and Python versions (unlike hash()).

`first` is where the counter starts: 0 for a whole batch. A data-parallel rank
that holds rows [lo, hi) of the global batch passes dropout_seed = (seed, lo)
and starts at first = lo * (elements per sample), so its rows get exactly the
masks they would get in one process holding the whole batch.
"""
from __future__ import annotations

import zlib

import numpy as np

from . import backend

MASK64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15           # 2^64 / golden ratio: SplitMix64's increment
_MIX1, _MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def site_id(prefix: str) -> int:
    """A dropout site's id: CRC-32 of its block's parameter prefix (an int in [0, 2^32))."""
    return zlib.crc32(prefix.encode("utf-8"))


def splitmix64_int(z: int) -> int:
    """SplitMix64 finaliser on one Python int (exact 64-bit wrap-around via the mask)."""
    z &= MASK64
    z = ((z ^ (z >> 30)) * _MIX1) & MASK64
    z = ((z ^ (z >> 27)) * _MIX2) & MASK64
    return z ^ (z >> 31)


def stream_key(dropout_seed, site: int) -> int:
    """key = splitmix64(splitmix64(dropout_seed) XOR site): one 64-bit stream per (seed, site)."""
    if isinstance(dropout_seed, bool) or not isinstance(dropout_seed, (int, np.integer)):
        raise ValueError(f"dropout_seed must be an int (or None for evaluation mode), got {dropout_seed!r}")
    if not 0 <= int(dropout_seed) <= MASK64:
        raise ValueError(f"dropout_seed must lie in [0, 2^64), got {dropout_seed}; derive it from the run's "
                         "seed and step with non-negative integers")
    return splitmix64_int(splitmix64_int(int(dropout_seed)) ^ (int(site) & MASK64))


def _check_p(p):
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")


# ----------------------------------------------------------------------------
# NumPy (reference) path
# ----------------------------------------------------------------------------

def keep_mask_numpy(n: int, p: float, key: int, first: int = 0):
    """keep (n,) bool: u[i] >= p for the counters first .. first+n-1 of stream `key` (uint64 arithmetic)."""
    u64 = np.uint64
    z = np.arange(first + 1, first + n + 1, dtype=np.uint64)   # first + i + 1
    z *= u64(GOLDEN)                                     # (first + i + 1) * GOLDEN   (mod 2^64: arrays wrap)
    z += u64(key)                                        # key + (first + i + 1) * GOLDEN
    # splitmix64: z ^= z >> 30; z *= M1; z ^= z >> 27; z *= M2; z ^= z >> 31
    z ^= z >> u64(30)
    z *= u64(_MIX1)
    z ^= z >> u64(27)
    z *= u64(_MIX2)
    z ^= z >> u64(31)
    z >>= u64(11)                                        # top 53 bits
    # u = z * 2^-53 is exact in float64, so u >= p  <=>  z >= p * 2^53 compared as doubles
    return z.astype(np.float64) * 2.0 ** -53 >= p


def dropout_apply_numpy(x, p: float, key: int, first: int = 0):
    """x * keep / (1 - p); the scale is rounded to x.dtype first, as the kernel does."""
    keep = keep_mask_numpy(x.size, p, key, first).reshape(x.shape)
    scale = x.dtype.type(1.0 / (1.0 - p))
    return np.where(keep, x * scale, x.dtype.type(0))


# ----------------------------------------------------------------------------
# CuPy path (kernels/dropout.cu)
# ----------------------------------------------------------------------------

def dropout_apply_cupy(x, p: float, key: int, first: int = 0):
    """The CUDA kernel `dropout_apply`: the same hash per element, one grid-stride pass."""
    from . import cuda
    cp = backend.array_module(x)
    x = cp.ascontiguousarray(x)                          # flat index = C-order index, as in NumPy
    y = cp.empty_like(x)
    kernel = cuda.get_kernel("dropout", "dropout_apply", x.dtype)
    cuda.launch_1d(kernel, x.size, (x, y, np.int64(x.size), np.uint64(key), np.uint64(first), np.float64(p),
                                    x.dtype.type(1.0 / (1.0 - p))))
    return y


def dropout_apply(x, p: float, key: int, first: int = 0):
    """y = x * keep / (1 - p) for the stream `key` from counter `first`: the one NumPy/CuPy dispatch point."""
    if backend.is_cupy(backend.array_module(x)):
        return dropout_apply_cupy(x, p, key, first)
    return dropout_apply_numpy(x, p, key, first)


# ----------------------------------------------------------------------------
# Public forward / backward
# ----------------------------------------------------------------------------

def dropout_forward(x, p: float, dropout_seed, site: int):
    """x: (N, ...); p in [0, 1); dropout_seed: int, (int, first_row) for rows of a larger batch
    (see the module docstring), or None for evaluation mode (y = x); site: the layer's id
    (site_id(prefix)). Returns (y, cache)."""
    _check_p(p)
    if p == 0.0 or dropout_seed is None:
        return x, None
    seed, first_row = dropout_seed if isinstance(dropout_seed, tuple) else (dropout_seed, 0)
    key = stream_key(seed, site)
    first = int(first_row) * (x.size // max(1, x.shape[0]))     # counters of the rows before ours
    # y = x * keep / (1 - p)        (inverted dropout: E[y] = x)
    return dropout_apply(x, p, key, first), (p, key, first)


def dropout_backward(dy, cache):
    """-> dx, {} (no parameters). The mask is recomputed from (p, key), not stored."""
    if cache is None:
        return dy, {}
    p, key, first = cache
    # y = x * keep / (1 - p)   =>  dx = dy * keep / (1 - p): the same map applied to dy
    return dropout_apply(dy, p, key, first), {}


# ----------------------------------------------------------------------------
# Forward-mode tangent (JVP) and its backward (reverse over forward)
# ----------------------------------------------------------------------------

def dropout_jvp(x, x_dot, p: float, dropout_seed, site: int):
    """y = x * keep / (1 - p) is linear in x for a fixed mask, and the mask is a function of
    (dropout_seed, site, element), so the tangent uses the SAME mask:
        y_dot = x_dot * keep / (1 - p)            -> (y, y_dot, cache)."""
    y, cache = dropout_forward(x, p, dropout_seed, site)
    y_dot, _ = dropout_forward(x_dot, p, dropout_seed, site)
    return y, y_dot, cache


def dropout_jvp_backward(dy, dy_dot, cache):
    """-> (dx, dx_dot, {}): the same masked map applied to both cotangents."""
    return dropout_backward(dy, cache)[0], dropout_backward(dy_dot, cache)[0], {}
