"""Bilinear resizing with half-pixel centres (align_corners=False, no antialiasing),
matching torch.nn.functional.interpolate(mode="bilinear").

For an output index i of n_out, reading an input of n_in:
    src = (i + 0.5) * n_in / n_out - 0.5, clamped below at 0
    i0 = floor(src), i1 = min(i0 + 1, n_in - 1), w = src - i0
    out[i] = (1 - w) in[i0] + w in[i1]
The resize is separable: y = Mh @ x @ Mw^T with two (n_out, n_in) interpolation
matrices, two batched GEMMs (cuBLAS on the GPU).
"""
from __future__ import annotations

import numpy as np

from . import backend


def interpolation_matrix(n_in: int, n_out: int) -> np.ndarray:
    src = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    src = np.maximum(src, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w = src - i0
    M = np.zeros((n_out, n_in))
    M[np.arange(n_out), i0] += 1 - w
    M[np.arange(n_out), i1] += w
    return M


def resize_bilinear(x, out_h: int, out_w: int):
    """x (N, C, H, W) -> (N, C, out_h, out_w)."""
    xp = backend.array_module(x)
    N, C, H, W = x.shape
    Mh = xp.asarray(interpolation_matrix(H, out_h).astype(x.dtype))
    Mw = xp.asarray(interpolation_matrix(W, out_w).astype(x.dtype))
    rows = xp.matmul(Mh, x.reshape(N * C, H, W))          # (NC, out_h, W)
    return xp.matmul(rows, Mw.T).reshape(N, C, out_h, out_w)
